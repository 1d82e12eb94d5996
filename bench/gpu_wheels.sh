#!/usr/bin/env bash
# Run on the machine without a GPU, before a lease:  bash bench/gpu_wheels.sh
# Downloads the pure-Python wheels the GPU machine lacks into .whl/ (git-ignored). Name ".whl" in
# the device call's carry; bench/gpu_run.sh installs them. pytest-xdist spreads the tests over that
# machine's cores: Triton compiles every kernel for every new shape on first use, and those compiles,
# not the GPU, set how long the test suite takes there.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pytest-xdist==3.8.0 execnet==2.1.2
ls .whl
