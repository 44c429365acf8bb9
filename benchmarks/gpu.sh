#!/usr/bin/env bash
# The GPU run (docs/benchmarks.md, "The GPU run"): training, generation and propagation measured on one
# CUDA GPU in at most 8 minutes, stage by stage, each under its own time cap; every row is written
# into OUT_DIR (results.json, results.md, console.txt) as soon as it is measured.
#
#   bash benchmarks/gpu.sh OUT_DIR              # the GPU run
#   bash benchmarks/gpu.sh OUT_DIR --dry-run    # every stage at tiny sizes, also on a CPU
#
# Wheels in .whl/ at the repository's root (diffusers, where the machine lacks it) are installed first
# into WHEEL_TARGET (default /tmp/site), which goes first on PYTHONPATH. PYTHON names the interpreter
# (default: python3). The other options: python3 benchmarks/bench_gpu.py --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    site="${WHEEL_TARGET:-/tmp/site}"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$root"/.whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec "$python" "$root/benchmarks/bench_gpu.py" "$@"
