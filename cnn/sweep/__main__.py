"""`python -m cnn.sweep`: `cnn sweep` (cnn/cli/sweep.py)."""

import sys

from cnn.cli.sweep import run

if __name__ == "__main__":
    run(["python -m cnn.sweep", *sys.argv[1:]])
