"""`python -m cnn.main`: `cnn train` (cnn/cli/main.py)."""

import sys

from cnn.cli.main import command

if __name__ == "__main__":
    command(["python -m cnn.main", *sys.argv[1:]])
