#!/usr/bin/env bash
# CamVid training and the 1x1-head ablation on the GPU machine, one command each,
# from the repository root (the device tool runs commands there):
#
#   bash scripts/run_gpu.sh camvid [--minutes 8] [train.py flags ...]
#   bash scripts/run_gpu.sh ablation [--minutes 8] [scripts/ablation.py flags ...]
#   bash scripts/run_gpu.sh camvid --smoke      # seconds-long check of this script (any machine, CPU too)
#
# `camvid` trains configs/camvid.py into $RUNS/camvid (default /tmp/fcn_runs),
# then evaluates it on val (python -m fcn.evaluate); `ablation` runs
# scripts/ablation.py with configs/camvid.py (pass --override key=value to
# shorten it, --seeds to choose seeds). Training gets SIGTERM after --minutes:
# it saves a checkpoint and stops cleanly, so a run cut by the device tool's
# 10-minute limit still reports what it reached, and the same command resumes it
# while the machine is warm. A run so stopped exits with its command's own code (timeout
# --preserve-status): 0 from train.py once it has saved, 130 from scripts/ablation.py, not
# timeout's 124, which the device tool reads as "ran past its limit". The log, metrics.jsonl, eval_val.json and the
# report's PNGs (ablation: ablation.md, loss_curves.png and every run's
# metrics.jsonl in one tar) are copied to $OUT (the device tool's output
# folder; /tmp/fcn_out elsewhere).
#
# Data: CamVid from $FCN_CAMVID_DIR, else ../shared/datasets/camvid, else
# data/camvid (git-ignored). The device tool sends only the repository, so
# before the call, here:
#
#   mkdir -p data && cp -r ../shared/datasets/camvid data/camvid   # 37 MB; delete after
#   device run: carry ["wheels", "data"], timeout_s 600
#
# Python packages the machine lacks come from wheels/: see scripts/gpu_env.sh. So do XLA's
# autotuning results carried in autotune/: with them the first step skips choosing the
# convolutions' algorithms (about 3 minutes on an empty cache), so a run timed as a new user's
# first is one without autotune/ in its carry.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: bash scripts/run_gpu.sh camvid|ablation [--minutes M] [--smoke] [flags ...]}
shift
case "$what" in
  camvid|ablation) ;;
  *) echo "unknown: $what (camvid or ablation)" >&2; exit 2 ;;
esac
minutes=8
smoke=0
extra=()
while (($#)); do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --smoke) smoke=1; shift ;;
    *) extra+=("$1"); shift ;;
  esac
done

source scripts/gpu_env.sh   # sets PY, OUT_DIR, PYTHONPATH for carried wheels

if [[ -z "${FCN_CAMVID_DIR:-}" ]]; then
  for d in ../shared/datasets/camvid data/camvid; do
    if [[ -d $d ]]; then export FCN_CAMVID_DIR=$PWD/$d; break; fi
  done
fi
echo "CamVid: ${FCN_CAMVID_DIR:-not found (train.py will say where it looked)}"
runs=${RUNS:-/tmp/fcn_runs}
mkdir -p "$runs"

if ((smoke)); then  # the same commands at toy scale: 2 steps at 64 x 96, width 4, float32
  small=(model.features=4 model.depth=2 model.dtype=float32 augment.crop_size="(64,96)" model.input_scale=0.25
         num_steps=2 eval_every=2 checkpoint_every=2 log_every=1 batch_size=2 eval_batch_size=2 eval_hflip=False)
  runs=$runs/smoke
else
  small=()
fi

status=0
case "$what" in
  camvid)
    workdir=$runs/camvid
    flags=()
    for kv in "${small[@]}"; do flags+=("--config.$kv"); done
    # SIGTERM: train.py saves a checkpoint and exits; the evaluation below still runs.
    timeout --preserve-status -s TERM -k 120 "${minutes}m" "$PY" train.py --config configs/camvid.py --workdir "$workdir" \
      "${flags[@]}" "${extra[@]}" 2>&1 | tr '\r' '\n' | tee "$OUT_DIR/train.log" || status=$?
    if [[ -d $workdir/checkpoints ]]; then
      "$PY" -m fcn.evaluate --workdir "$workdir" --split val 2>&1 | tee "$OUT_DIR/eval.log" || status=$?
    fi
    for f in metrics.jsonl eval_val.json eval_val_confusion.png eval_val_iou.png eval_val_examples.png config.json; do
      [[ -f $workdir/$f ]] && cp "$workdir/$f" "$OUT_DIR/"
    done
    ;;
  ablation)
    out=$runs/ablation
    overrides=()
    for kv in "${small[@]}"; do overrides+=(--override "$kv"); done
    timeout --preserve-status -s TERM -k 120 "${minutes}m" "$PY" scripts/ablation.py --config configs/camvid.py --out "$out" \
      "${overrides[@]}" "${extra[@]}" 2>&1 | tr '\r' '\n' | tee "$OUT_DIR/ablation.log" || status=$?
    for f in ablation.md loss_curves.png; do
      [[ -f $out/$f ]] && cp "$out/$f" "$OUT_DIR/"
    done
    (cd "$out" 2>/dev/null && tar czf "$OUT_DIR/ablation_metrics.tgz" ./*/metrics.jsonl ./*/config.json 2>/dev/null) || true
    ;;
esac
echo "results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $status
