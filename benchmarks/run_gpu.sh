#!/usr/bin/env bash
# fcn against PyTorch on one GPU, in one command, from the repository root:
#
#   bash benchmarks/run_gpu.sh            # CamVid full recipe: 8 x 360 x 480, bfloat16
#   bash benchmarks/run_gpu.sh --tiny     # seconds-long check of the script itself (any machine)
#
# Extra arguments go to benchmarks/speed.py. Python packages the machine lacks
# (ml_collections; flax when too old) are installed from wheels/ when present:
#   pip download --no-deps --only-binary=:all: ml_collections==1.1.0 flax==0.12.8 -d wheels/
# The device tool carries wheels/ (git-ignored) with `carry: ["wheels"]`.
# Results: the table on stdout; JSON and log in $OUT when set (the device
# tool's output folder), else in /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcn_site wheels/*.whl
  export PYTHONPATH=/tmp/fcn_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
"$PY" -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__, "| torch", torch.__version__, torch.cuda.is_available())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true

if [[ "${1:-}" == "--tiny" ]]; then
  shift
  args=(--batch 2 --size 36 48 --features 4 --depth 2 --steps 1 --repeats 2 --torch_variants eager+cl)
else
  # CamVid full recipe (configs/camvid.py): 8 x 360 x 480, the default architecture, bfloat16 compute.
  args=(--batch 8 --size 360 480 --features 32 --depth 4 --steps 10 --repeats 5
        --torch_variants eager+cl,compile+cl)
fi
"$PY" benchmarks/speed.py "${args[@]}" --dtype bfloat16 --conv_impls xla,gemm --conv_impl auto \
  --json "$out/speed_gpu.json" "$@" 2>&1 | tee "$out/speed_gpu.log"
