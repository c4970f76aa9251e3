"""Runs hps_core.bench.redis (also `hps bench redis`); see that module."""

import sys

from hps_core.bench.redis import main

if __name__ == "__main__":
    sys.exit(main())
