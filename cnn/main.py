"""`python -m cnn.main`: `cnn train` (cnn/cli/main.py)."""

import sys

from cnn.cli.main import run

if __name__ == "__main__":
    run(["python -m cnn.main", *sys.argv[1:]])
