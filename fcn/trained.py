"""A trained run's checkpoint, named the one way that fcn.evaluate, fcn.predict, fcn.export and fcn.load take it.

Each takes a workdir written by train.py, with "best" (its best checkpoint, or the latest while no
evaluation has saved one) or "latest"; or one checkpoint folder in it, `{workdir}/checkpoints/N` or
`{workdir}/best/N`, which names its own step. `resolve` turns either into (workdir, which, step) and
`restore` reads it, so the four commands accept the same forms and give the same errors (a step not
on disk names the steps its folder holds). Light to import: the commands add their flags before JAX
is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

WHICH = ("best", "latest")
WORKDIR_HELP = "a workdir written by train.py, or one checkpoint in it: WORKDIR/checkpoints/N or WORKDIR/best/N"
CHECKPOINT_HELP = "which checkpoint of a workdir (default: best; a checkpoint folder names its own)"
HFLIP_HELP = "flip test-time augmentation: average with the mirror image's logits (default: the run's eval_hflip)"


def add_flags(parser) -> None:
    """--workdir and --checkpoint, as every command that reads a trained run has them."""
    parser.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    parser.add_argument("--checkpoint", default="best", choices=WHICH, help=CHECKPOINT_HELP)


def resolve(path: str | Path, which: str = "best") -> tuple[Path, str, int | None]:
    """(workdir, which, step) of what a command was given.

    path: a workdir, read at `which` ("best" or "latest"; step None: the folder's best or latest,
    and "best" falls back to the latest without a best), or `{workdir}/checkpoints/N` (which
    "latest") or `{workdir}/best/N` (which "best"), at step N, whatever `which` says.
    """
    if which not in WHICH:  # anything else would read the latest
        raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    path = Path(path)
    kind = path.parent.name
    if kind in ("checkpoints", "best") and path.name.isdigit():  # one checkpoint
        return path.parent.parent, "best" if kind == "best" else "latest", int(path.name)
    return path, which, None


class Restored(NamedTuple):
    workdir: Path
    checkpoint: str  # the folder read, relative to the workdir: "best/6", "checkpoints/3"
    config: Any  # the run's config (ml_collections.ConfigDict), with any data overrides
    info: dict  # dataset.json: class names, palette, ignore label
    graphs: Any  # fcn.state.Graphs
    state: Any  # the restored training state
    default: bool  # the workdir's own choice (its best, else its latest): no flag or folder named another


def restore(path: str | Path, which: str = "best", *, data_overrides=(), sharding=None) -> Restored:
    """The checkpoint `resolve(path, which)` names, with its run's config and dataset info.

    data_overrides: `--config.data.KEY=VALUE` arguments (fcn.cli.with_data_overrides), applied
    before anything is restored. sharding: where to put the arrays (`Checkpoints.restore`).
    """
    from fcn import checkpoint, state as state_lib
    from fcn.cli import with_data_overrides

    workdir, which, step = resolve(path, which)
    default = which == "best" and step is None
    config = with_data_overrides(checkpoint.load_config(workdir), list(data_overrides))
    info = checkpoint.read_json(workdir / "dataset.json")
    graphs, abstract, _ = state_lib.abstract_state(config, len(info["class_names"]), workdir=workdir)
    ckpts = checkpoint.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        if default:
            which = ckpts.best_or_latest()
        state = ckpts.restore(abstract, which=which, step=step, sharding=sharding)
    finally:
        ckpts.close()
    folder = f"{'best' if which == 'best' else 'checkpoints'}/{int(state['step'])}"
    return Restored(workdir, folder, config, info, graphs, state, default)
