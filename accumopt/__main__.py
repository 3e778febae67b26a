"""``python -m accumopt``: the same command line as the ``accumopt`` script (see :mod:`accumopt.demo`)."""

from .demo import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m accumopt"))
