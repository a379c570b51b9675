"""`python -m cnn.predict`: the prediction command line (cnn/cli/predict.py)."""

from cnn.cli.predict import run

if __name__ == "__main__":
    run()
