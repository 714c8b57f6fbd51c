"""Evaluate a trained workdir on a split: dataset-wide metrics, a report, and pictures.

    python -m fcn.evaluate --workdir runs/camvid_cpu --split val [--config.data.path=DIR]

prints a per-class table and the summary scores, and writes
`{workdir}/eval_{split}.json`, `eval_{split}_confusion.png`,
`eval_{split}_iou.png` and `eval_{split}_examples.png` (with `--examples 0`, or
with several processes, none: an earlier one is removed), of the best
checkpoint (the latest while no evaluation has saved a best). `--checkpoint latest`,
or `--workdir {workdir}/checkpoints/N` (or
`best/N`: that saved step, `fcn.trained.resolve`), writes `eval_{split}_stepN.json`
and `eval_{split}_stepN_*.png` instead, beside the best's; the report's `step` and
`checkpoint` say which was evaluated, and `hflip` whether with `--hflip` (or the run's
eval_hflip). The model and the data
settings are the workdir's (config.json); `--config.data.KEY=VALUE` overrides a
data setting as train.py does, e.g. the data's path when it has moved.
`--batch_size N` sets the images per batch over all devices (default: the
workdir's eval_batch_size, rounded up to a multiple of the device count).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from fcn import checkpoint, metrics, sharding, state as state_lib, trained
from fcn.cli import exits_130_on_ctrl_c, out_of_memory
from fcn.data import pipeline
from fcn.data.base import Split
from fcn.progress import progress_bar

# Evaluation's bar appears once it has run this long: CamVid val (101 images) took 2.8 s on a 2-core CPU
# with configs/camvid_cpu.py and 68 s with configs/camvid.py in float32, so no count of images tells apart
# the evaluations worth a bar. Where stderr is no terminal its first line comes at 30 s (fcn.progress).
_PROGRESS_AFTER_S = 5


def evaluate_split(
    eval_step,
    state,
    split: Split,
    config,
    num_classes: int,
    mesh,
    *,
    keep_examples: int = 0,
    in_flight=None,
    logits_step=None,
    desc: str = "evaluating",
    leave: bool = True,
) -> tuple[np.ndarray, list]:
    """Run `eval_step` over a whole split; returns ([K, K] int64 confusion, kept examples).

    kept examples: up to `keep_examples` (image, label, prediction) triples at
    the labels' resolution (without the batch's padding), for pictures. in_flight: batches evaluated at once
    (`batches_in_flight()` when None); the sums, and so the result, are the
    same for any value. config.eval_hflip must say whether `eval_step` flips.
    logits_step: `jit_eval_steps`' second, for images that `data.max_size` shrank (`pipeline.eval_split`):
    their logits are scaled up to the label's size on the host as `fcn.load(...).predict` scales them.
    desc, leave: the progress bar's (over images, shown after _PROGRESS_AFTER_S, by process 0 only);
    leave=False clears it from a terminal at the end.
    """
    from fcn.inputs import resize_channels

    sharding.check_batch_size(config.eval_batch_size, "eval_batch_size")
    rows = sharding.process_slice(config.eval_batch_size)
    acc = metrics.ConfusionAccumulator(num_classes)
    full_size = np.zeros((num_classes, num_classes), np.int64)  # images scored at their labels' size
    kept = []
    # Images whose sizes round up to the same multiple of 2**depth are padded to it, in the model's pad mode,
    # and batched together: the network pads them so itself, so no prediction changes. Not where it resizes
    # its input first (input_scale < 1: it pads after resizing): there an image is batched only with images
    # of its own size. With flip test-time augmentation (config.eval_hflip), padding after the last column would
    # come first in the mirrored image: images are padded only below, and batched with images of their own width.
    multiple = 2**config.model.depth if config.model.input_scale == 1 else 1
    multiple = (multiple, 1 if config.get("eval_hflip", False) else multiple)
    batches = pipeline.eval_batches(
        split, config.eval_batch_size, multiple, config.data.ignore_label, config.model.pad_mode
    )

    def run(images, labels, shrunk):
        if shrunk:
            if logits_step is None:
                raise ValueError("images shrunk by data.max_size need evaluate_split(logits_step=...)")
            return logits_step(state, *sharding.put_batch(mesh, images[rows]))
        x, y = sharding.put_batch(mesh, images[rows], labels[rows])
        return eval_step(state, x, y)

    def scaled_up(logits, idx, sizes) -> dict:
        """This process's shrunk images' predictions at their labels' size, scored; {row: prediction}."""
        local = [np.asarray(s.data) for s in sorted(logits.addressable_shards, key=lambda s: s.index[0].start or 0)]
        preds = {}
        for row, logits_HWK in zip(range(config.eval_batch_size)[rows], np.concatenate(local)):
            if row < len(idx):  # else a row that fills a short batch
                (h, w), label = sizes[row], split.labels[idx[row]]
                preds[row] = resize_channels(np.array(logits_HWK[:h, :w]), *label.shape).argmax(-1).astype(np.uint8)
                full_size[:] += metrics.host_confusion_matrix(label, preds[row], num_classes, config.data.ignore_label)
        return preds

    def consume(images, labels, idx, sizes, shrunk, out):
        if shrunk:
            preds = scaled_up(out, idx, sizes)
        else:
            cm, preds = out
            acc.add(cm, labels.size)
        if len(kept) < keep_examples and jax.process_count() == 1:
            preds = preds if shrunk else np.asarray(preds)
            for row, (h, w) in enumerate(sizes[: keep_examples - len(kept)]):
                image, label = images[row, :h, :w], labels[row, :h, :w]
                if shrunk:  # the picture at the label's size
                    label = split.labels[idx[row]]
                    image = np.asarray(Image.fromarray(image).resize(label.shape[::-1], Image.Resampling.BILINEAR))
                kept.append((image, label, preds[row][: label.shape[0], : label.shape[1]]))

    def is_shrunk(idx, sizes) -> bool:
        return split.labels[idx[0]].shape != tuple(sizes[0])

    in_flight = batches_in_flight() if in_flight is None else in_flight
    pending: collections.deque = collections.deque()  # consumed in batch order: the same kept examples
    bar = progress_bar(
        total=len(split),
        desc=desc,
        unit="image",
        leave=leave,
        delay=_PROGRESS_AFTER_S,
        disable=jax.process_index() != 0,
    )

    def finish_oldest():
        *batch, task = pending.popleft()
        consume(*batch, task.result())
        bar.update(len(batch[2]))  # its images (idx), not the rows that fill a short batch

    with bar, ThreadPoolExecutor(max_workers=max(1, in_flight)) as pool:
        for images, labels, idx, sizes in batches:
            shrunk = is_shrunk(idx, sizes)
            if in_flight <= 1:
                task = Future()
                task.set_result(run(images, labels, shrunk))
            else:  # each thread waits for its own batch: XLA:CPU then runs the programs side by side
                task = pool.submit(lambda i, lab, s: jax.block_until_ready(run(i, lab, s)), images, labels, shrunk)
            pending.append((images, labels, idx, sizes, shrunk, task))
            if len(pending) >= in_flight:
                finish_oldest()
        while pending:
            finish_oldest()
    return acc.result() + _summed_over_processes(full_size), kept


def _summed_over_processes(cm: np.ndarray) -> np.ndarray:
    """A host matrix summed over all processes (each scored its own rows); int64 travels as int32 pairs."""
    if jax.process_count() == 1:
        return cm
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(cm.view(np.int32)))
    return gathered.view(np.int64).sum(axis=0)


def jit_eval_steps(graphs, num_classes: int, ignore_label: int, hflip: bool, mesh):
    """(eval_step, logits_step) for `evaluate_split`, jitted: every process reads the confusion matrix."""
    eval_step = jax.jit(
        state_lib.make_eval_step(graphs, num_classes, ignore_label, hflip=hflip),
        out_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),  # (confusion, predictions)
    )
    return eval_step, jax.jit(state_lib.make_logits_step(graphs, hflip), out_shardings=sharding.batch_sharding(mesh))


def batches_in_flight() -> int:
    """Batches `evaluate_split` runs at once: 2 on a CPU backend in a single process, else 1.

    With XLA's own convolutions, some run on one core (YNNPACK, the middle
    levels of the U-Net); two programs started from two threads run side by
    side. On 2 cores, evaluating CamVid val with configs/camvid_cpu.py went from
    3.3-3.5 s to 2.4-3.0 s; three at once gave no more. With oneDNN's
    convolutions (one call at a time, each on every core) one and two at once
    measured alike (docs/benchmarks.md, fifth session). Not with several
    processes, whose collectives must come in the same order everywhere, nor on
    accelerators, which queue programs asynchronously anyway.
    """
    return 2 if jax.default_backend() == "cpu" and jax.process_count() == 1 else 1


def report(cm: np.ndarray, class_names, *, split: str, step: int | None = None) -> dict:
    """The JSON report of a confusion matrix."""
    s = metrics.scores(cm)
    nan_to_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    return {
        "split": split,
        "step": step,
        "mean_iou": nan_to_none(s["mean_iou"]),
        "pixel_accuracy": nan_to_none(s["pixel_accuracy"]),
        "mean_accuracy": nan_to_none(s["mean_accuracy"]),
        "fw_iou": nan_to_none(s["fw_iou"]),
        "num_pixels": s["num_pixels"],
        "per_class": [
            {"name": n, "iou": nan_to_none(i), "accuracy": nan_to_none(a), "dice": nan_to_none(d)}
            for n, i, a, d in zip(class_names, s["iou"], s["accuracy"], s["dice"])
        ],
        "confusion_matrix": cm.tolist(),
    }


def pct(value: float | None, spec: str = "5.1f") -> str:
    """A metric in percent, or "-" at the same width where it is undefined (None: no class scored)."""
    return f"{'-':>{len(format(0.0, spec))}}" if value is None else format(100 * value, spec)


def headline(rep: dict) -> str:
    """One line for a training log: the mean IoU and pixel accuracy of a report."""
    return f"mean IoU {pct(rep['mean_iou'], '.2f')}, pixel accuracy {pct(rep['pixel_accuracy'], '.2f')}"


def format_report(rep: dict) -> str:
    """A table a person reads at a glance."""
    width = max([12, *(len(c["name"]) for c in rep["per_class"])])
    lines = [f"{'class':<{width}}    IoU    acc", "-" * (width + 15)]
    lines += [f"{c['name']:<{width}}  {pct(c['iou'])}  {pct(c['accuracy'])}" for c in rep["per_class"]]
    lines += [
        "-" * (width + 15),
        f"mean IoU {pct(rep['mean_iou'])}   pixel acc {pct(rep['pixel_accuracy'])}   "
        f"mean acc {pct(rep['mean_accuracy'])}   fw IoU {pct(rep['fw_iou'])}",
    ]
    return "\n".join(lines)


@exits_130_on_ctrl_c()
def main(argv=None) -> int:
    from fcn.cli import DATA_OVERRIDE, is_data_override

    parser = argparse.ArgumentParser(
        prog="python -m fcn.evaluate",
        description=__doc__.split("\n")[0],
        epilog=f"{DATA_OVERRIDE}KEY=VALUE overrides a data setting of the workdir's config, as in train.py: "
        f"e.g. {DATA_OVERRIDE}path=DIR when the data has moved.",
    )
    trained.add_flags(parser)
    parser.add_argument("--split", default="val", help="a split the data source offers (default: val)")
    parser.add_argument(
        "--examples",
        type=int,
        default=4,
        help="images drawn as image | ground truth | prediction in the report's examples picture (default: 4; "
        "0: none, and an earlier evaluation's picture is removed)",
    )
    parser.add_argument("--hflip", action="store_true", help=trained.HFLIP_HELP)
    parser.add_argument(
        "--batch_size",
        type=int,
        help="images per batch over all devices, a multiple of their count (default: the workdir's "
        "eval_batch_size, rounded up to one); the scores do not depend on it",
    )
    parser.add_argument("--coordinator", help="host:port of process 0 of a multi-process run (or FCN_COORDINATOR)")
    parser.add_argument("--num_processes", type=int, help="processes of a multi-process run (or FCN_NUM_PROCESSES)")
    parser.add_argument("--process_id", type=int, help="this process's index (or FCN_PROCESS_ID)")
    args, rest = parser.parse_known_args(argv)
    args.data_overrides = rest  # --config.data.KEY=VALUE (or KEY VALUE): parsed against the workdir's config
    if args.examples < 0:
        parser.error(f"--examples={args.examples}: expected a number of example overlays, 0 or more")
    stray = [a for a in rest if a.startswith("-") and not is_data_override(a)]
    if stray:
        parser.error(
            f"unrecognized arguments: {' '.join(stray)} (the model and training settings are the workdir's; "
            f"{DATA_OVERRIDE}KEY=VALUE overrides a data setting)"
        )

    from fcn.distributed import DistributedError, maybe_initialize

    try:  # first, before JAX touches a device
        maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from fcn.checkpoint import CheckpointError
    from fcn.data.images import DataError

    try:
        return _evaluate(args)
    except (FileNotFoundError, CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # XLA's errors are RuntimeErrors
        if (oom := out_of_memory(e)) is None:
            raise
        now, n_dev = getattr(args, "batch_in_use", None), jax.device_count()  # (set once the model is loaded)
        if now is None:
            print(
                f"error: {oom} loading {args.workdir}: its model does not fit in this device's memory", file=sys.stderr
            )
            return 1
        smaller = f"--batch_size={max(n_dev, now // 2 // n_dev * n_dev)} (now {now})"
        flip = " or without --hflip" if args.hflip else ""
        print(
            f"error: {oom} evaluating {args.workdir} on {args.split!r}; to use less memory try {smaller}{flip}",
            file=sys.stderr,
        )
        return 1


def _evaluate(args) -> int:
    from fcn.traced import enable_compilation_cache

    enable_compilation_cache()  # a second evaluation reads the compiled step back
    mesh = sharding.make_mesh()
    if args.batch_size is not None:  # before anything is read
        sharding.check_batch_size(args.batch_size, "--batch_size")
    at = sharding.replicated(mesh)  # every process restores the whole state
    run = trained.restore(args.workdir, args.checkpoint, data_overrides=args.data_overrides, sharding=at)
    workdir, config, info, graphs, state = run.workdir, run.config, run.info, run.graphs, run.state
    # eval_{split}.json is the workdir's default checkpoint's; any other's is named by its step, beside it.
    stem = f"eval_{args.split}" + ("" if run.default else f"_step{int(state['step'])}")
    with config.unlocked():
        config.eval_hflip = bool(args.hflip or config.get("eval_hflip", False))  # how evaluate_split batches
    config.eval_batch_size = args.batch_in_use = _eval_batch_size(args.batch_size, config.eval_batch_size)
    num_classes = len(info["class_names"])
    check_classes(config.data, info["class_names"], workdir)
    split = pipeline.eval_split(config.data, args.split)
    state = jax.device_put(state, sharding.replicated(mesh))
    eval_step, logits_step = jit_eval_steps(graphs, num_classes, info["ignore_label"], config.eval_hflip, mesh)
    t0 = time.time()
    positional = (eval_step, state, split, config, num_classes, mesh)
    cm, kept = evaluate_split(
        *positional, keep_examples=args.examples, logits_step=logits_step, desc=f"evaluate {args.split}"
    )
    rep = report(cm, info["class_names"], split=args.split, step=int(state["step"]))
    rep["checkpoint"], rep["seconds"] = run.checkpoint, round(time.time() - t0, 2)
    rep["hflip"] = config.eval_hflip  # other scores of the same step, in the same file: say which
    if jax.process_index() == 0:
        flip = ", with flip test-time augmentation" if config.eval_hflip else ""
        print(f"{workdir}: {args.split} split, {len(split)} images, step {rep['step']} ({run.checkpoint}){flip}")
        print(format_report(rep))
        try:
            _write(workdir, stem, rep, cm, kept, info)
        except OSError as e:  # a workdir one may read but not write, a full disk: after the table, not a traceback
            print(f"error: cannot write {e.filename or workdir}: {e.strerror or e}", file=sys.stderr)
            return 1
        print(f"wrote {workdir}/{stem}.json and pictures")
    return 0


def _write(workdir: Path, stem: str, rep: dict, cm: np.ndarray, kept: list, info: dict) -> None:
    """The report `{stem}.json` and its pictures `{stem}_*.png` in workdir (an OSError names the file)."""
    from fcn import viz

    checkpoint.write_json_atomic(workdir / f"{stem}.json", rep)
    viz.save_confusion(workdir / f"{stem}_confusion.png", cm, info["class_names"])
    viz.save_iou_bars(workdir / f"{stem}_iou.png", rep)
    examples = workdir / f"{stem}_examples.png"
    if kept:
        viz.save_examples(examples, kept, info["class_names"], np.asarray(info["palette"], np.uint8))
    else:  # --examples 0 (or several processes): an earlier evaluation's picture would pass for this one's
        examples.unlink(missing_ok=True)


def check_classes(data_config, model_classes, workdir) -> None:
    """A DataError unless the data (the workdir's, or as `--config.data.KEY=VALUE` changed it) has the
    model's number of classes: a label id the model has no class for counted nowhere, so the scores left
    its pixels out without a word (and ids of another class list mean other classes)."""
    from fcn.data import get_source
    from fcn.data.base import DataError

    data_classes = get_source(data_config).class_names
    if len(data_classes) != len(model_classes):
        raise DataError(
            f"data.class_names: the data ({data_config.source}) has {len(data_classes)} classes "
            f"({', '.join(data_classes)}) but the model in {workdir} was trained on {len(model_classes)} "
            f"({', '.join(model_classes)}); evaluate it on data labelled with its classes"
        )


def _eval_batch_size(chosen: int | None, saved: int) -> int:
    """--batch_size, or the workdir's eval_batch_size rounded up to a multiple of the device count: a
    workdir trained on other devices evaluates here, with the same scores (a short batch is filled
    with all-ignore examples, which count no pixel)."""
    if chosen is not None:
        return chosen
    batch = sharding.round_up_to_devices(saved)
    if batch != saved and jax.process_index() == 0:
        print(
            f"the workdir's eval_batch_size={saved} does not divide among {jax.device_count()} devices: "
            f"evaluating {batch} images at a time (--batch_size to choose)",
            file=sys.stderr,
        )
    return batch


if __name__ == "__main__":
    sys.exit(main())
