"""Runs hps_core.bench.host_tier (also `hps bench host-tier`); see that module."""

import sys

from hps_core.bench.host_tier import main

if __name__ == "__main__":
    sys.exit(main())
