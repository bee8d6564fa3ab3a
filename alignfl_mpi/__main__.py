"""``python -m alignfl_mpi`` is the same as ``alignfl-mpi``."""

import sys

from .cli import main

sys.exit(main())
