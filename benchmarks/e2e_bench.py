"""Runs hps_core.bench.e2e (also `hps bench e2e`); see that module."""

import sys

from hps_core.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
