"""Shared by the Triton kernel tests.

conftest.py turns on Triton's CPU interpreter before anything imports Triton (on machines without
a GPU). These tests feed CPU tensors, so they run only where the kernels are interpreted.
"""

import pytest


def interpreted_here() -> bool:
    try:
        import triton.language as tl
    except ImportError:
        return False
    return type(tl.zeros).__name__ == "InterpretedFunction"


INTERPRETED = interpreted_here()
interpreted = pytest.mark.skipif(not INTERPRETED, reason="no Triton, or Triton runs compiled here (GPU machine)")
