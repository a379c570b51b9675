"""`python -m cnn.visualize`: `cnn visualize` (cnn/cli/visualize.py)."""

import sys

from cnn.cli.visualize import command

if __name__ == "__main__":
    command(["python -m cnn.visualize", *sys.argv[1:]])
