"""`python -m cnn COMMAND ...`: the `cnn` command (cnn/cli/commands.py), for an environment without its script."""

from cnn.cli.commands import main

if __name__ == "__main__":
    main()
