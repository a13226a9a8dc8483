"""`python -m lsqint` (and `torchrun -m lsqint`) work like the `lsqint` command."""

import sys

from .app.cli import main

sys.exit(main())
