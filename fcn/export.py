"""Export a trained model for use without this package's model code.

    python -m fcn.export --workdir runs/camvid_cpu --out exported/camvid --size 360,480

writes into --out:
  model.jax       a serialized `jax.export` artifact (StableHLO and its calling
                  convention): images float32 [B, H, W, 3] in [0, 1] -> logits
                  float32 [B, H, W, K]; a softmax over K gives probabilities.
                  Reload with `jax.export.deserialize(bytes).call(images)`, or
                  `load_exported(dir)`, which adds class names and predict().
  model.json      class names, palette, ignore label, and this contract ("size":
                  [H, W] when exported for one size, else null; "max_size": the
                  training's data.max_size, 0 for none; "hflip": whether the
                  logits average the image's with its mirror image's, as the
                  run's eval_hflip (or --hflip) has fcn.load's predictor do;
                  "multiple": 2**depth, where `load_exported` puts tile origins;
                  "sha256": model.jax's, which `load_exported` checks).
  saved_model/    where TensorFlow is installed (it is imported only for this):
                  a TF SavedModel through jax2tf for TF Serving, signature
                  "serving_default": images -> {"logits"}, the same contract.
  model.tflite    with --tflite_size H,W: a TFLite model for one H x W image
                  (TFLite needs static shapes; the other two take any size).

An export replaces every one of these that --out held from an earlier export,
the ones it does not write too (no stale saved_model/ beside a new model.jax),
and leaves other files alone; files of these names with no model.json beside
them are no export's (a model.tflite of your own), and it refuses to start.
It is written in full into a hidden staging folder in --out first
(.fcn-export-*), so an export that fails leaves --out as it was; the folder
of an export that was killed (SIGKILL, a power cut) is removed by the next
export into --out, once no live process holds it (fcn/staging.py).

With --size H,W the artifact and the SavedModel take images of that size only
(any B). A model trained with `model.input_scale` below 1 (configs/camvid_cpu.py)
needs it: its first step resizes the image by input_scale, which needs concrete
sizes, so it is exported for one size (CamVid: --size 360,480). `load_exported`
then refuses other sizes with a message that names the exported one.

A model trained with data.max_size saw images shrunk to that longer side:
`load_exported(dir).predict` shrinks larger images alike and scales the logits
back, as `fcn.load(workdir).predict` does; callers of model.jax, the SavedModel
or the TFLite model shrink them themselves. --size and --tflite_size name the
size the model runs at, so a size with a side over max_size is refused, naming
the size it shrinks to.

Shapes. B, H and W are all symbolic ("b, h, w, 3"): one artifact for every
size >= 1. The model pads its input up to a multiple M = 2**depth with jnp.pad,
which needs static pad widths. For a symbolic h the export pads first, to the
symbolic size M * ceil(h / M), with the same padding written as a gather whose
indices are computed from h (equal to jnp.pad, even for pads longer than the
image); the model then has nothing left to pad, and the logits are cropped back
to h x w inside the artifact. So no caller needs to pad.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fcn import ops, trained
from fcn.cli import exits_130_on_ctrl_c, out_dir_error
from fcn.data.images import fitted_size
from fcn.export_tf import (
    INSTALL_TF,
    export_tf as _export_tf,  # the SavedModel and TFLite model (TF imported there only)
    input_shape,
    tensorflow_available,
)
from fcn.exported import (  # the reloading side
    ARTIFACT,
    METADATA,
    SAVED_MODEL,
    TFLITE,
    ExportedModel as ExportedModel,
    load_exported as load_exported,
)
from fcn.model import PAD_MODES
from fcn.staging import staging_folder

STAGING_PREFIX = ".fcn-export-"  # the hidden folder each export is written into first


def _pad_index(n, n_pad: int, mode: str):
    """Source index of each of n_pad output rows, as jnp.pad(mode) maps them; n may be symbolic."""
    i = jnp.arange(n_pad)
    if mode == "reflect":  # ...3 2 1 [0 1 2 3] 2 1 0 1...: period 2n - 2
        period = jnp.maximum(2 * n - 2, 1)
        j = i % period
        return jnp.where(j >= n, period - j, j)
    if mode == "symmetric":  # ...1 0 [0 1 2 3] 3 2...: period 2n
        j = i % (2 * n)
        return jnp.where(j >= n, 2 * n - 1 - j, j)
    if mode == "wrap":
        return i % n
    return jnp.minimum(i, n - 1)  # edge; constant masks these rows after


def pad_to_multiple(x_BHWC: jax.Array, multiple: int, mode: str) -> jax.Array:
    """Pad H and W after the end up to a multiple, like `fcn.model.pad_to_multiple`, for symbolic sizes."""
    if mode not in PAD_MODES:
        raise ValueError(f"model.pad_mode={mode!r} cannot be exported; exportable: {PAD_MODES}")
    for axis in (1, 2):
        n = x_BHWC.shape[axis]
        n_pad = (n + multiple - 1) // multiple * multiple
        x_BHWC = jnp.take(x_BHWC, _pad_index(n, n_pad, mode), axis=axis)
        if mode == "constant":
            inside = (jnp.arange(n_pad) < n).reshape((-1, 1) if axis == 1 else (1, -1))
            x_BHWC = jnp.where(inside[..., None], x_BHWC, 0)
    return x_BHWC


def serving_fn(model, size: tuple[int, int] | None = None, hflip: bool = False):
    """images float32 [B, H, W, 3] in [0, 1] -> logits float32 [B, H, W, K]: any sizes, or with `size`
    = (H, W) images of that size (the model then runs as it is, its resizing and padding included).
    hflip: the mean of the image's logits and its mirror image's, as `fcn.load(...).predict` with hflip."""
    fn = _logits_fn(model, size)
    if not hflip:
        return fn
    return lambda images_BHWC: 0.5 * (fn(images_BHWC) + fn(images_BHWC[:, :, ::-1])[:, :, ::-1])


def _logits_fn(model, size):
    if size is not None:
        return lambda images_BHWC: model(images_BHWC.astype(jnp.float32))
    multiple, mode = 2**model.depth, model.pad_mode
    if getattr(model, "input_scale", 1) != 1:
        # Resizing by input_scale needs concrete sizes; a symbolic H, W has none.
        raise ValueError(
            f"model.input_scale={model.input_scale}: the model resizes its input, which needs a concrete "
            "image size; export it for one size with --size H,W (CamVid: --size 360,480)"
        )

    def logits_fn(images_BHWC):
        _, h, w, _ = images_BHWC.shape
        padded_BHWC = pad_to_multiple(images_BHWC.astype(jnp.float32), multiple, mode)
        # prescaled: with input_scale 1 there is nothing to resize; it also skips the size
        # arithmetic that symbolic sizes do not support.
        return model(padded_BHWC, prescaled=True)[:, :h, :w]

    return logits_fn


def export_model(
    model,
    out: str | Path,
    info: dict,
    *,
    platforms=None,
    saved_model=True,
    tflite_size=None,
    size=None,
    hflip=False,
) -> list[Path]:
    """Write the artifacts described in the module docstring; returns their paths.

    size: (H, W) to export for images of that size only (any batch); None for any size.
    hflip: average with the mirrored image's logits inside the artifacts (the run's `eval_hflip`).
    """
    fn = serving_fn(model, size, hflip)  # refuses a model that needs a size, before anything is written
    info = {**info, "hflip": hflip, "multiple": 2**model.depth}
    for flag, hw in (("--size", size), ("--tflite_size", tflite_size)):
        _check_max_size(flag, hw, int(info.get("max_size", 0)))
    # Traced without fcn's CPU custom calls (fcn.ops.portable): the artifacts run anywhere.
    with ops.portable():
        return _export_model(fn, out, info, platforms, saved_model, tflite_size, size)


def not_ours(out: str | Path) -> str | None:
    """Why an export into `out` would replace files that no export of fcn's wrote, or None: files of the
    artifacts' names (a user's own model.tflite, say) with no model.json beside them, nor the staging
    folder of a killed export whose swap left them so. Checked before anything is written or loaded."""
    out = Path(out)
    names = [n for n in (ARTIFACT, SAVED_MODEL, TFLITE) if (out / n).exists() or (out / n).is_symlink()]
    if not names or (out / METADATA).exists() or any(out.glob(f"{STAGING_PREFIX}*")):
        return None
    shown = ", ".join(n + ("/" if (out / n).is_dir() else "") for n in names)
    return (
        f"--out {out} holds {shown} but no {METADATA}: not an earlier export of fcn's, and an export would "
        "replace them; choose another --out, or move them away"
    )


def _export_model(fn, out, info: dict, platforms, saved_model, tflite_size, size) -> list[Path]:
    """Write the whole export into a staging folder inside `out`, then swap it in (`_replace_artifacts`):
    an export that fails leaves `out` as it was; one killed leaves its staging folder, which the next
    export into `out` removes. Files of the artifacts' names that no export wrote are refused (not_ours)."""
    out = Path(out)
    if problem := not_ours(out):
        raise FileExistsError(problem)
    out.mkdir(parents=True, exist_ok=True)
    # Also removes the staging folders of exports into `out` that were killed (fcn.staging).
    with staging_folder(out, STAGING_PREFIX) as staging:
        names = _write_artifacts(fn, staging, info, platforms, saved_model, tflite_size, size)
        _replace_artifacts(staging, out, names)
    return [out / name for name in names]


def _check_max_size(flag: str, size, max_size: int) -> None:
    """Refuse a fixed size the model never sees: with `data.max_size`, larger images are shrunk first."""
    if size and max_size and max(size) > max_size:
        (h, w), (fh, fw) = size, fitted_size(*size, max_size)
        raise ValueError(
            f"{flag} {h},{w}: the model was trained with data.max_size={max_size}, so a {h}x{w} image is "
            f"shrunk to {fh}x{fw} before the model runs; export with {flag} {fh},{fw} "
            f"(load_exported shrinks {h}x{w} images to it)"
        )


def _write_artifacts(fn, out: Path, info: dict, platforms, saved_model, tflite_size, size) -> list[str]:
    from jax import export

    spec = jax.ShapeDtypeStruct(export.symbolic_shape(input_shape(size)), jnp.float32)
    exported = export.export(jax.jit(fn), platforms=platforms)(spec)
    artifact = exported.serialize()
    (out / ARTIFACT).write_bytes(artifact)
    meta = {
        "sha256": hashlib.sha256(artifact).hexdigest(),  # of model.jax: load_exported refuses a damaged one
        "class_names": list(info["class_names"]),
        "palette": np.asarray(info.get("palette", []), np.uint8).tolist(),
        "ignore_label": int(info.get("ignore_label", 255)),
        "input": "images float32 [B, H, W, 3], values in [0, 1], any B, "
        + ("H, W >= 1" if size is None else f"H = {size[0]}, W = {size[1]} only"),
        "size": None if size is None else list(size),  # [H, W] when exported for one size
        "output": "logits float32 [B, H, W, K]; softmax over K for probabilities",
        "platforms": list(exported.platforms),
        # Training shrank images to this longer side (0 = no): resize inputs alike.
        "max_size": int(info.get("max_size", 0)),
        # The logits are the mean of the image's and its mirror image's (eval_hflip, or --hflip).
        "hflip": bool(info.get("hflip", False)),
        # 2**depth: load_exported cuts large images into tiles whose origins are multiples of it, as fcn.load's.
        "multiple": int(info.get("multiple", 0)),
    }
    (out / METADATA).write_text(json.dumps(meta, indent=2))
    written = [ARTIFACT, METADATA]
    if saved_model or tflite_size:
        written += _export_tf(fn, out, exported.platforms, saved_model, tflite_size, size)
    return written


def _replace_artifacts(staging: Path, out: Path, names: list[str]) -> None:
    """Move a complete export from `staging` into `out`, and every artifact of an earlier export out of it
    (fcn's own names only: other files stay). model.json goes first and comes back last, so an interrupted
    swap leaves a folder that `load_exported` refuses, never one that mixes two exports."""
    previous = staging / "previous"
    previous.mkdir()
    for name in (METADATA, ARTIFACT, SAVED_MODEL, TFLITE):
        if (out / name).exists() or (out / name).is_symlink():
            (out / name).rename(previous / name)
    for name in sorted(names, key=lambda n: n == METADATA):
        (staging / name).rename(out / name)


@exits_130_on_ctrl_c()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn.export", description=__doc__.split("\n")[0])
    trained.add_flags(parser)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--platforms", default="", help="comma-separated, e.g. cpu,cuda (default: this machine's)")
    parser.add_argument("--no_saved_model", action="store_true", help="skip the TF SavedModel")
    parser.add_argument(
        "--hflip",
        action="store_true",
        help="average with horizontally flipped predictions in the artifacts (default: the run's eval_hflip)",
    )
    parser.add_argument("--tflite_size", default="", help="H,W: also write a TFLite model for that fixed size")
    parser.add_argument(
        "--size",
        default="",
        help="H,W: export for images of that size only (needed for models with input_scale below 1, "
        "such as configs/camvid_cpu.py's: --size 360,480)",
    )
    args = parser.parse_args(argv)
    tflite_size, size = _size_flag(parser, "tflite_size", args.tflite_size), _size_flag(parser, "size", args.size)
    platforms = _platforms_flag(parser, args.platforms)
    saved_model = not args.no_saved_model and tensorflow_available()
    if tflite_size and not tensorflow_available():
        print(f"error: --tflite_size needs tensorflow, which is not installed: {INSTALL_TF}", file=sys.stderr)
        return 1
    if not args.no_saved_model and not saved_model:
        print(f"note: tensorflow is not installed, so no SavedModel: {INSTALL_TF}", file=sys.stderr)

    out = Path(args.out)
    if problem := out_dir_error(args.out) or not_ours(out):
        print(f"error: {problem}", file=sys.stderr)
        return 1

    from fcn.checkpoint import CheckpointError
    from fcn.inference import load

    try:
        seg = load(args.workdir, which=args.checkpoint, **({"hflip": True} if args.hflip else {}))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: cannot load {args.workdir}: {e}", file=sys.stderr)
        return 1
    info = {"class_names": seg.class_names, "palette": seg.palette, "ignore_label": seg.ignore_label}
    info["max_size"] = seg.max_size
    try:
        written = export_model(
            seg.model,
            out,
            info,
            platforms=platforms,
            saved_model=saved_model,
            tflite_size=tflite_size,
            size=size,
            hflip=seg.hflip,
        )
    except ValueError as e:  # a model that cannot be exported as asked: say why (no artifact is written)
        print(f"error: {args.workdir}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write the export to {out}: {e}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export and jax2tf take


def _platforms_flag(parser, value: str) -> tuple[str, ...] | None:
    """--platforms=a,b as a tuple; '' as None (this machine's); an unknown name a usage error naming it."""
    platforms = tuple(dict.fromkeys(p.strip() for p in value.split(",") if p.strip())) or None
    if unknown := [p for p in platforms or () if p not in PLATFORMS]:
        parser.error(
            f"--platforms={value!r}: unknown {', '.join(map(repr, unknown))}; expected a comma-separated subset of "
            f"{', '.join(PLATFORMS)} (an NVIDIA GPU is cuda, an AMD one rocm)"
        )
    return platforms


def _size_flag(parser, name: str, value: str) -> tuple[int, int] | None:
    """--NAME=H,W as (H, W); '' as None; anything else a usage error that names the flag."""
    if not value:
        return None
    try:
        size = tuple(int(v) for v in value.split(","))
        if len(size) != 2 or min(size) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--{name}={value!r}: expected H,W, e.g. 360,480")
    return size


if __name__ == "__main__":
    sys.exit(main())
