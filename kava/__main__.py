"""``python -m kava`` = the ``kava`` command."""
import sys

from kava.cli import main

if __name__ == "__main__":
    sys.exit(main())
