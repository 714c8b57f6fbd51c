"""The 1x1-head ablation: head variants x bottleneck on/off x seeds, one command.

    python scripts/ablation.py --config configs/camvid.py --seeds 0,1,2 \
        --out runs/ablation [--override optimizer.learning_rate=1e-3 ...]

Trains every variant (head linear | stacked | mlp, bottleneck 0 | 4) for each
seed into `OUT/<variant>_s<seed>` (re-running resumes an unfinished run, and reads a
finished one's metrics.jsonl without starting it), then writes `OUT/ablation.md` (mean and standard deviation
of val mean IoU over seeds, parameters, FLOPs per image (360x480, or --flops_size) from XLA's cost
analysis, training images per second) and `OUT/loss_curves.png` (mean training
loss per variant over steps). An --override of what the sweep sets (seed, model.head,
model.bottleneck) is refused.

Ctrl-C (or SIGTERM) saves the run in progress, as train.py does, and stops the
ablation there with exit code 130 and no report; the same command resumes it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEADS = ("linear", "stacked", "mlp")
BOTTLENECKS = (0, 4)


def load_config(path: str, overrides: list[str]):
    """The config file with `key=value` overrides, parsed as train.py parses `--config.key=value`.

    The same ml_collections config flag (in a flag set of its own), locked: an
    unknown key or a value of the wrong type is an error that names it.
    """
    from absl import flags
    from ml_collections import config_flags

    from fcn.cli import config_file_errors_in_one_line, flag_error

    argv = [sys.argv[0], f"--config={path}", *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    config_file_errors_in_one_line(values)  # a missing file, a syntax error: one line, as in train.py
    try:
        values(argv)
        return values.config
    except (AttributeError, KeyError, flags.Error) as e:
        raise SystemExit(f"error: {flag_error(e)}") from None


def num_classes(config) -> int:
    from fcn.data import get_source

    return get_source(config.data).num_classes


def missing_eval_split(config) -> str | None:
    """The error to print where the data offer no config.data.eval_split, else None.

    Such a run trains without evaluation (a warning), so it never gets the final evaluation the
    table needs: it was taken for one stopped by a signal, at every re-run of the same command.
    """
    from fcn.data import get_source
    from fcn.data.images import DataError

    try:
        source = get_source(config.data)
    except DataError:
        return None  # the first run_training says it, in one line
    if config.data.eval_split in source.splits:
        return None
    return (
        f"config.data.eval_split={config.data.eval_split!r}: the {source.name} data offer no such split (only "
        f"{', '.join(source.splits)}), and the ablation tabulates each run's final evaluation on it"
    )


def train_logs(workdir: Path) -> tuple[list[tuple[int, float]], list[float], float | None]:
    """(step, loss) pairs, images/s values, and the final eval mean IoU from metrics.jsonl."""
    losses, speeds, miou = [], [], None
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses.append((row["step"], row["loss"]))
            speeds.append(row["images_per_sec"])
        if "eval_mean_iou" in row:
            miou = row["eval_mean_iou"]
    return losses, speeds, miou


def finished(loss: list, workdir: Path, config) -> bool:
    """Whether a run's metrics.jsonl reaches config.num_steps and records its final evaluation.

    That evaluation's mean IoU may be null (no pixel scored: fcn.metrics_log), which is
    finished all the same: retraining would not change it.
    """
    from fcn.metrics_log import evaluated_at

    return bool(loss) and loss[-1][0] >= config.num_steps and evaluated_at(workdir, config.num_steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/camvid.py")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--override", action="append", default=[], help="key=value on top of the config")
    parser.add_argument(
        "--flops_size",
        type=int,
        nargs=2,
        default=(360, 480),
        metavar=("H", "W"),
        help="image size for the FLOPs column",
    )
    parser.add_argument(
        "--report_only", action="store_true", help="train nothing: the table of the runs already finished"
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds={args.seeds!r}: expected integers separated by commas, e.g. 0,1,2")
    if twice := sorted({s for s in seeds if seeds.count(s) > 1}):  # one run, else tabulated as several
        parser.error(f"--seeds={args.seeds!r}: seed {', '.join(map(str, twice))} twice; each seed is one run")
    for o in args.override:  # else replaced for every run without a word, and listed in the table's command
        key = o.split("=", 1)[0].strip()
        if key == "seed":
            parser.error(f"--override {o}: the sweep sets the seed of each run; give them as --seeds")
        if key in ("model.head", "model.bottleneck"):
            parser.error(
                f"--override {o}: the sweep sets {key} for each variant (heads {', '.join(HEADS)} x "
                f"bottleneck {' | '.join(map(str, BOTTLENECKS))})"
            )

    from fcn.cli import retain_memory, run_training

    retain_memory()  # as train.py does, before JAX starts its threads
    from flax import nnx

    from fcn.model import from_config
    from fcn.summary import layer_rows

    out = Path(args.out)
    if not args.report_only and (error := missing_eval_split(load_config(args.config, args.override))):
        print(f"error: {error}", file=sys.stderr)
        return 1
    rows, curves = [], {}
    for head in HEADS:
        for bottleneck in BOTTLENECKS:
            name = f"{head}" + (f"+bottleneck{bottleneck}" if bottleneck else "")
            mious, speeds, per_seed = [], [], []
            for seed in seeds:
                config = load_config(args.config, args.override)
                config.seed, config.model.head, config.model.bottleneck = seed, head, bottleneck
                workdir = out / f"{name}_s{seed}"
                # A run finished by an earlier call is read, not started again (train.py would load the data and
                # the state only to say "nothing to train": seconds of a GPU slice per run); --report_only reads.
                loss, speed, miou = train_logs(workdir) if (workdir / "metrics.jsonl").exists() else ([], [], None)
                if not finished(loss, workdir, config):
                    if args.report_only:
                        continue
                    if code := run_training(config, workdir):  # an error: said in one line
                        return code
                    loss, speed, miou = train_logs(workdir)
                    if not finished(loss, workdir, config):  # stopped by a signal, with a checkpoint saved
                        print(f"ablation stopped at {workdir}: run the same command again to resume", file=sys.stderr)
                        return 130
                if miou is None:
                    print(
                        f"error: {workdir}: the final evaluation scored no pixel (every label of the split is"
                        f" config.data.ignore_label={config.data.ignore_label}), so its mean IoU is undefined",
                        file=sys.stderr,
                    )
                    return 1
                mious.append(miou)
                speeds.extend(speed[1:])  # the first logged interval includes compilation
                per_seed.append(loss)
            if not mious:
                continue
            # Shapes are all the table needs: no initialisers run (nor compile).
            model = nnx.eval_shape(lambda c=config: from_config(c.model, num_classes(c), rngs=nnx.Rngs(0)))
            _, total = layer_rows(model, (1, *args.flops_size, 3))
            # The steps every seed logged: a run stopped by a signal logged its loss at the step it stopped at,
            # and keeps that line once resumed, where an uninterrupted seed has none.
            steps = sorted(set.intersection(*({s for s, _ in run} for run in per_seed)))
            curves[name] = (steps, np.mean([[dict(run)[s] for s in steps] for run in per_seed], axis=0))
            rows.append(
                (
                    name,
                    np.mean(mious),
                    np.std(mious, ddof=1) if len(mious) > 1 else float("nan"),  # sample standard deviation
                    mious,
                    total["params"],
                    total["flops"],
                    float(np.median(speeds)) if speeds else float("nan"),
                )
            )
    if not rows:  # --report_only only: a training run finishes or returns above
        print(
            f"error: --out {out} holds no finished run of seeds {args.seeds} (each in OUT/<variant>_s<seed>): "
            "nothing to tabulate; its ablation.md, if any, is left as it is",
            file=sys.stderr,
        )
        return 1
    write_report(out, rows, curves, args)
    return 0


def write_report(out: Path, rows, curves, args) -> None:
    command = ["python", "scripts/ablation.py", "--config", args.config, "--seeds", args.seeds, "--out", args.out]
    command += [a for o in args.override for a in ("--override", o)]
    if tuple(args.flops_size) != (360, 480):  # the default: the GFLOPs column is the same without it
        command += ["--flops_size", *map(str, args.flops_size)]
    lines = [
        f"Command: `{shlex.join(command)}`",
        "",
        "| variant | val mean IoU (mean ± std) | per seed | parameters "
        f"| GFLOPs / {args.flops_size[0]}x{args.flops_size[1]} image | train img/s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, mean, std, mious, params, flops, speed in rows:
        seeds = ", ".join(f"{100 * m:.1f}" for m in mious)
        # One seed has no standard deviation, a run without logged speeds no speed: said, not "nan".
        iou = f"{100 * mean:.2f} ± {100 * std:.2f}" if np.isfinite(std) else f"{100 * mean:.2f} (one seed)"
        img_s = f"{speed:.1f}" if np.isfinite(speed) else "not logged"
        lines.append(f"| {name} | {iou} | {seeds} | {params:,} | {flops / 1e9:.1f} | {img_s} |")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, loss) in curves.items():
        ax.plot(steps, loss, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)


if __name__ == "__main__":
    sys.exit(main())
