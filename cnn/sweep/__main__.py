"""`python -m cnn.sweep`: the sweep command line (cnn/cli/sweep.py)."""

import sys

from cnn.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
