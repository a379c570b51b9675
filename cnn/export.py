"""`python -m cnn.export`: `cnn export` (cnn/cli/export.py)."""

import sys

from cnn.cli.export import command

if __name__ == "__main__":
    command(["python -m cnn.export", *sys.argv[1:]])
