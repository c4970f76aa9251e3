"""Runs hps_core.bench.cache (also `hps bench cache`); see that module."""

import sys

from hps_core.bench.cache import main

if __name__ == "__main__":
    sys.exit(main())
