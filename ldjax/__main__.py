"""``python -m ldjax ...``: the ``ldjax`` console script (:func:`ldjax.cli.main`)."""
import sys

from ldjax.cli import main

if __name__ == "__main__":
    sys.exit(main())
