"""Suite-wide settings."""

import os

if os.environ.get("HPS_CUPY_NO_POOL"):
    # Under compute-sanitizer: every CuPy array its own cudaMalloc, so an access past an
    # array's end is outside any allocation (a pooled array's neighbours would hide it).
    try:
        import cupy

        cupy.cuda.set_allocator(None)
    except ImportError:
        pass
