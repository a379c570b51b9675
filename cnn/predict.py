"""`python -m cnn.predict`: the prediction command line (cnn/cli/predict.py)."""

from cnn.cli.predict import command_line

if __name__ == "__main__":
    command_line()
