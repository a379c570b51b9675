"""`python -m cnn.visualize`: `cnn visualize` (cnn/cli/visualize.py)."""

import sys

from cnn.cli.visualize import run

if __name__ == "__main__":
    run(["python -m cnn.visualize", *sys.argv[1:]])
