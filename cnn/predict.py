"""`python -m cnn.predict`: `cnn predict` (cnn/cli/predict.py)."""

import sys

from cnn.cli.predict import command

if __name__ == "__main__":
    command(["python -m cnn.predict", *sys.argv[1:]])
