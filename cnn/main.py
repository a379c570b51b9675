"""`python -m cnn.main`: the training command line (cnn/cli/main.py)."""

from cnn.cli.main import run

if __name__ == "__main__":
    run()
