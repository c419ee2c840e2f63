"""`python -m fqtbench`: the command line (also how Lightning's DDP launcher re-runs it per rank)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
