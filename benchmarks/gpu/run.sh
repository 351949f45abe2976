#!/usr/bin/env bash
# farsync on one NVIDIA GPU, in one command of under 10 minutes (benchmarks/gpu/gpu_bench.py
# says what it measures): tests with a CUDA variant, MFU, codecs, memory, overlap, quality.
#
#   OUT=DIR benchmarks/gpu/run.sh [--budget-s 520] [--parts tests,ceilings,...]
#
# Results go to $OUT (default benchmarks/out/gpu): gpu.json (rewritten after every part),
# gpu.png, pytest.log, bench.log; benchmarks/results/gpu.json is a copy of a run's gpu.json.
# The machine's python3 must hold torch with CUDA; a package farsync needs that it lacks
# travels as a wheel in .whl/ (made beside the code, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl tomli-w
# ) and is installed into /tmp/site here, nothing fetched.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, tomli_w, typer, tokenizers; assert torch.cuda.is_available(), 'no CUDA device'" \
    || { echo "run.sh: python3 lacks farsync's dependencies or a CUDA device (the line above)"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/bench.log"
python3 benchmarks/gpu/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"
