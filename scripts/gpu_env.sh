# Sourced by the GPU commands (scripts/run_gpu.sh, benchmarks/run_gpu.sh): the
# Python environment of the device machine, which has jax, optax, orbax, numpy,
# pillow, matplotlib, tqdm and torch but no ml_collections, tensorboardX or
# TensorFlow, and no network.
#
# Wheels carried in wheels/ (git-ignored) are installed into $FCN_SITE (default
# /tmp/fcn_site) and put first on PYTHONPATH. Fetch them once, on a machine with
# a package index:
#
#   pip download --no-deps --only-binary=:all: -d wheels/ ml_collections==1.1.0 tensorboardX==2.6.5
#
# and for benchmarks/cudnn_graphs.py (`run_gpu.sh --cudnn_graphs`) cuDNN's Python frontend, for the
# machine's Python 3.12 (1.12.0: 1.7 MB, no dependencies; later releases pull in CUTLASS's DSL):
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d wheels/ nvidia-cudnn-frontend==1.12.0
#
# The machine's own flax and orbax serve: on 2026-11-22 its jax 0.11.2 ran fcn with
# its flax 0.12.10 and orbax-checkpoint 0.12.4, and the flax the tests run with
# (0.12.8) did not import there. Should flax or orbax wheels be carried anyway and
# fcn not import with them, they are dropped and the machine's own are used, and
# the line printed says so. Then print what the run will use.
PY=${PYTHON:-python3}
FCN_SITE=${FCN_SITE:-/tmp/fcn_site}
if compgen -G "wheels/*.whl" >/dev/null; then
  rm -rf "$FCN_SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$FCN_SITE" wheels/*.whl
  export PYTHONPATH=$FCN_SITE${PYTHONPATH:+:$PYTHONPATH}
  if ! err=$("$PY" -c "import fcn.model, fcn.state, fcn.checkpoint" 2>&1); then
    echo "fcn does not import with the carried flax/orbax (${err##*$'\n'}); using the machine's own" >&2
    rm -rf "$FCN_SITE"/flax* "$FCN_SITE"/orbax*
  fi
fi
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/fcn_out}
mkdir -p "$OUT_DIR"

# One compilation cache for every process of the call (fcn's benchmark variants and trees,
# train.py, fcn.evaluate, profile_step.py). jax keeps XLA's autotuning results there too, in
# xla_gpu_per_fusion_autotune_cache_dir: which cuDNN algorithm each convolution runs, about
# 170 s of an empty-cache start of the full recipe on an H200. A process then times only the
# convolutions no process of the call has timed before, and every variant of an A/B run gets
# the same algorithm for the same convolution.
# Across calls (each may start on a fresh machine): results carried in autotune/ (git-ignored;
# an earlier call's $OUT/autotune.tgz unpacked) seed the cache when they were made with the same
# jaxlib, CUDA plugin, cuDNN and GPU (XLA leaves that check to its user); the call's own are
# written to $OUT/autotune.tgz when it ends.
export FCN_JAX_CACHE=${FCN_JAX_CACHE:-/tmp/fcn_jax_cache}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$FCN_JAX_CACHE}
FCN_AUTOTUNE_DIR=$JAX_COMPILATION_CACHE_DIR/xla_gpu_per_fusion_autotune_cache_dir
mkdir -p "$FCN_AUTOTUNE_DIR"
# One Python start (jax's import and the GPU's set-up take seconds) prints what the run will use
# and writes to a file the jaxlib, CUDA plugin, cuDNN and GPU that autotuning results are valid for.
_fcn_key_file=$(mktemp)
"$PY" - "$_fcn_key_file" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, distributions, version
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
names = ("jaxlib", "jax-cuda", "jax_cuda", "nvidia-cudnn-cu", "nvidia_cudnn_cu")  # not cuDNN's frontend: no kernels
found = {f"{d.metadata['Name']}=={d.version}" for d in distributions() if (d.metadata["Name"] or "").lower().startswith(names)}
with open(sys.argv[1], "w") as f:
    print(" ".join([*sorted(found), jax.devices()[0].device_kind.replace(" ", "_")]), file=f)
PYEOF
FCN_AUTOTUNE_KEY=$(cat "$_fcn_key_file")
rm -f "$_fcn_key_file"
if [[ -f autotune/KEY ]]; then
  if [[ "$(cat autotune/KEY)" == "$FCN_AUTOTUNE_KEY" ]]; then
    find autotune -mindepth 1 -maxdepth 1 ! -name KEY -exec cp -r {} "$FCN_AUTOTUNE_DIR/" \;
    echo "XLA autotuning results: $(find "$FCN_AUTOTUNE_DIR" -type f | wc -l) seeded from autotune/"
  else
    echo "autotune/ was made with $(cat autotune/KEY), not $FCN_AUTOTUNE_KEY: not used"
  fi
fi
_fcn_save_autotune() {
  if [[ -n "$(ls -A "$FCN_AUTOTUNE_DIR" 2>/dev/null)" ]]; then
    local keydir
    keydir=$(mktemp -d)
    echo "$FCN_AUTOTUNE_KEY" >"$keydir/KEY"
    tar czf "$OUT_DIR/autotune.tgz" -C "$FCN_AUTOTUNE_DIR" . -C "$keydir" KEY || true
    rm -rf "$keydir"
  fi
}
trap _fcn_save_autotune EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
