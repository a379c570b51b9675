"""`python -m cnn.visualize`: the picture command line (cnn/cli/visualize.py)."""

from cnn.cli.visualize import command_line

if __name__ == "__main__":
    command_line()
