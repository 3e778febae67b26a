"""``python -m accumopt demo``: the same command line as the ``accumopt`` script (see :mod:`accumopt.demo`)."""

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m accumopt"))
