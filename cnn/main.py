"""`python -m cnn.main`: `cnn train` (cnn/cli/main.py)."""

import sys

if __name__ == "__main__":
    from cnn import runtime

    runtime.restart_with_huge_pages()  # before JAX is imported: glibc reads its tunables at start

from cnn.cli.main import command

if __name__ == "__main__":
    command(["python -m cnn.main", *sys.argv[1:]])
