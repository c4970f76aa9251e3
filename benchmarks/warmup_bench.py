"""Runs hps_core.bench.warmup (also `hps bench warmup`); see that module."""

import sys

from hps_core.bench.warmup import main

if __name__ == "__main__":
    sys.exit(main())
