"""`python -m edgeblock.cli ...`: the same as the `edgeblock` command."""

import sys

from . import main

sys.exit(main())
