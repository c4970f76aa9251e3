"""Runs hps_core.bench.memory (also `hps bench memory`); see that module."""

import sys

from hps_core.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
