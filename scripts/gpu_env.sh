# Sourced by the GPU commands (scripts/run_gpu.sh, benchmarks/run_gpu.sh): the
# Python environment of the device machine, which has jax, optax, orbax, numpy,
# pillow, matplotlib, tqdm and torch but no ml_collections, tensorboardX or
# TensorFlow, and no network.
#
# Wheels carried in wheels/ (git-ignored) are installed into /tmp/fcn_site and
# put first on PYTHONPATH. Fetch them once, on a machine with a package index:
#
#   pip download --no-deps --only-binary=:all: -d wheels/ \
#       ml_collections==1.1.0 tensorboardX==2.6.5 flax==0.12.8 orbax-checkpoint==0.12.8
#
# (flax and orbax pinned to the versions the tests run with; their own
# dependencies are on that machine.) Then print what the run will use.
PY=${PYTHON:-python3}
if compgen -G "wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fcn_site wheels/*.whl
  export PYTHONPATH=/tmp/fcn_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/fcn_out}
mkdir -p "$OUT_DIR"
"$PY" - <<'PYEOF'
from importlib.metadata import PackageNotFoundError, version
import jax
parts = [f"jax {jax.__version__} {jax.devices()}"]
for name in ("flax", "optax", "orbax-checkpoint", "ml_collections", "tensorboardX", "torch"):
    try:
        parts.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        parts.append(f"{name} MISSING")
print(" | ".join(parts), flush=True)
missing = [p.split()[0] for p in parts if p.endswith("MISSING") and not p.startswith("torch")]
if missing:
    print(f"missing: {', '.join(missing)}: carry them as wheels (see scripts/gpu_env.sh)", flush=True)
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
