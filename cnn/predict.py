"""`python -m cnn.predict`: `cnn predict` (cnn/cli/predict.py)."""

import sys

from cnn.cli.predict import run

if __name__ == "__main__":
    run(["python -m cnn.predict", *sys.argv[1:]])
