"""When the Triton kernels run interpreted, and whether they autotune.

``VKERNELS_TRITON_AUTOTUNE=0`` makes every kernel run the first config of its list without
benchmarking the others. The GPU test suite sets it (tests/conftest.py): it meets hundreds of shapes,
and autotuning each would compile every config of every kernel for it, minutes more than the tests
themselves; the benchmarks autotune, and check each result against PyTorch before timing it.
"""
import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("VKERNELS_TRITON_AUTOTUNE", "1") != "0"
