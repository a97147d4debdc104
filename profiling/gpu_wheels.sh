#!/usr/bin/env bash
# Download the wheels profiling/gpu_check.sh needs on the lent H200 (Python 3.12, x86_64, no network
# there): the dependencies its image lacks. Run here, then name .whl in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for pkg in ase vesin pymetis nvtx; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg" || echo "could not fetch $pkg" >&2
done
ls -la .whl
