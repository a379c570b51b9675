"""`python -m cnn.main`: the training command line (cnn/cli/main.py)."""

from cnn.cli.main import command_line

if __name__ == "__main__":
    command_line()
