"""`python -m node ...` is the same as the `swarmtune` command."""

import sys

from node.cli import main

sys.exit(main())
