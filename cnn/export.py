"""`python -m cnn.export`: `cnn export` (cnn/cli/export.py)."""

import sys

from cnn.cli.export import run

if __name__ == "__main__":
    run(["python -m cnn.export", *sys.argv[1:]])
