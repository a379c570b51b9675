"""`python -m cnn.sweep`: `cnn sweep` (cnn/cli/sweep.py)."""

import sys

from cnn.cli.sweep import command

if __name__ == "__main__":
    command(["python -m cnn.sweep", *sys.argv[1:]])
