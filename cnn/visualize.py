"""`python -m cnn.visualize`: the picture command line (cnn/cli/visualize.py)."""

from cnn.cli.visualize import run

if __name__ == "__main__":
    run()
