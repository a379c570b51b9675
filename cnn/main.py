"""`python -m cnn.main`: `cnn train` (cnn/cli/main.py)."""

import sys

if __name__ == "__main__":
    from cnn import runtime

    runtime.restart_with_allocator()  # before JAX is imported: the loader and glibc read the environment at start

from cnn.cli.main import command

if __name__ == "__main__":
    command(["python -m cnn.main", *sys.argv[1:]])
