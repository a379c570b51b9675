"""`python -m cnn.sweep`: see cnn/sweep/__init__.py."""

import sys

from cnn.sweep import main

sys.exit(main())
