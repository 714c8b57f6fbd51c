#!/usr/bin/env bash
# fcn against PyTorch on one GPU, in one command, from the repository root:
#
#   bash benchmarks/run_gpu.sh            # CamVid full recipe: 16 x 360 x 480, bfloat16
#   bash benchmarks/run_gpu.sh --tiny     # seconds-long check of the script itself (any machine)
#   bash benchmarks/run_gpu.sh --profile  # where fcn's training and inference steps spend the GPU's time
#   bash benchmarks/run_gpu.sh --head_loss  # the fused network-end kernel against XLA's, alone and in the step
#   bash benchmarks/run_gpu.sh --fused_conv # a prototype conv kernel with batch norm in, against cuDNN + XLA's passes
#   bash benchmarks/run_gpu.sh --fused_block # each conv block's forward + backward with those kernels, against fcn's
#   bash benchmarks/run_gpu.sh --cudnn_graphs # each conv with batch norm fused in by cuDNN's own graphs, against XLA's
#                                           # (needs nvidia-cudnn-frontend's wheel in wheels/: scripts/gpu_env.sh)
#   bash benchmarks/run_gpu.sh --conv_impls 'gemm,gemm+fused:A:conv1:dgrad' --torch_variants '' --skip_startup
#                                           # the whole step with those kernels (benchmarks/fused_model.py) beside fcn's
#
# Extra arguments go to benchmarks/speed.py. Python packages the machine lacks
# come from wheels/ (scripts/gpu_env.sh says which and how to fetch them); the
# device tool carries wheels/ (git-ignored) with `carry: ["wheels"]`.
# Results: the table on stdout; JSON and log in $OUT when set (the device
# tool's output folder), else in /tmp/fcn_out.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh   # sets PY and OUT_DIR; carried wheels first on PYTHONPATH

if [[ "${1:-}" == "--profile" ]]; then
  # benchmarks/profile_step.py at the same size (training, inference, the augmentation alone): kernels by class and by name, to $OUT_DIR/profile_*.log.
  # The two steps share XLA's autotuning through the call's compilation cache (scripts/gpu_env.sh).
  shift
  for what in train predict augment; do
    "$PY" benchmarks/profile_step.py --batch 16 --size 360 480 --features 32 --depth 4 --dtype bfloat16 \
      --steps 5 --warmup 5 --top 40 --what "$what" "$@" 2>&1 | grep -v cuda_timer | tee "$OUT_DIR/profile_$what.log"
  done
  exit 0
fi
if [[ "${1:-}" == "--head_loss" ]]; then
  # benchmarks/head_loss.py at the full recipe's size: values compared, then timed side by side.
  shift
  "$PY" benchmarks/head_loss.py --batch 16 --size 360 480 --features 32 --depth 4 --dtype bfloat16 "$@" 2>&1 \
    | tee "$OUT_DIR/head_loss.log"
  exit 0
fi
if [[ "${1:-}" == "--fused_conv" ]]; then
  # benchmarks/fused_conv.py at the same size: each 3x3 conv of the network, values compared, then timed.
  shift
  "$PY" benchmarks/fused_conv.py --batch 16 --size 360 480 --features 32 --depth 4 --dtype bfloat16 "$@" 2>&1 \
    | tee "$OUT_DIR/fused_conv.log"
  exit 0
fi
if [[ "${1:-}" == "--fused_block" ]]; then
  # benchmarks/fused_block.py at the same size: each of the network's 9 conv blocks, forward + backward,
  # values compared, then timed; the total a step would save against the 2.6 ms that 40% MFU needs.
  shift
  "$PY" benchmarks/fused_block.py --batch 16 --size 360 480 --features 32 --depth 4 --dtype bfloat16 "$@" 2>&1 \
    | tee "$OUT_DIR/fused_block.log"
  exit 0
fi
if [[ "${1:-}" == "--cudnn_graphs" ]]; then
  # benchmarks/cudnn_graphs.py at the same size: each 3x3 conv's cuDNN graphs (batch norm + ReLU in, statistics
  # out), values compared, then timed against XLA's in one process. jax leaves GPU memory to PyTorch's tensors.
  shift
  XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" benchmarks/cudnn_graphs.py --batch 16 --size 360 480 --features 32 \
    --depth 4 --dtype bfloat16 "$@" 2>&1 | tee "$OUT_DIR/cudnn_graphs.log"
  exit 0
fi
if [[ "${1:-}" == "--tiny" ]]; then
  shift
  args=(--batch 2 --size 36 48 --features 4 --depth 2 --steps 1 --repeats 2 --torch_variants eager+cl)
else
  # CamVid full recipe (configs/camvid.py): its batch of 16 at 360 x 480, the default architecture, bfloat16 compute.
  args=(--batch 16 --size 360 480 --features 32 --depth 4 --steps 10 --repeats 5
        --torch_variants eager+cl,compile+cl)
fi
"$PY" benchmarks/speed.py "${args[@]}" --dtype bfloat16 --conv_impls xla,gemm --conv_impl auto \
  --json "$OUT_DIR/speed_gpu.json" "$@" 2>&1 | tee "$OUT_DIR/speed_gpu.log"
