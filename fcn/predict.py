"""Predict class maps for image files with a trained workdir.

    python -m fcn.predict --workdir runs/camvid_cpu --out preds/ street.jpg more/ ...

For each input image `NAME.ext` it writes `OUT/NAME_classes.png`, the class ids
as a palette PNG (it opens as colours; the pixel values are the class ids),
and `OUT/NAME_overlay.png`, the image blended with those colours. A directory
argument stands for the images directly inside it. Inputs are only read,
never written. Inputs that cannot be used (missing, not an image, empty, a
directory without images) are reported by name and skipped; the exit code is
0 when every input was predicted, 1 when some failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_PROGRESS_MIN_FILES = 2  # a bar for a single file is noise


def _is_output(path: Path) -> bool:
    return path.name.endswith(("_classes.png", "_overlay.png"))


def expand_inputs(args: list[str], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """(image files, error messages) from file and directory arguments, in order, without repeats.

    A directory that is also `out` contributes no earlier outputs of ours.
    """
    files: list[Path] = []
    errors: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if out is not None and out.exists() and path.resolve() == out.resolve():
                found = [p for p in found if not _is_output(p)]
            if not found:
                errors.append(f"{path}: directory with no images (looked for {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            errors.append(f"{path}: no such file or directory")
    first: dict[Path, Path] = {}  # the same file named twice is predicted once
    for p in files:
        first.setdefault(p.resolve(), p)
    return list(first.values()), errors


def output_names(files: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(class map path, overlay path) per input: unique, and never an input path."""
    inputs = {p.resolve() for p in files}
    used: set[str] = set()
    names = []
    for path in files:
        stem, n = path.stem, 1
        while True:
            pair = (out / f"{stem}_classes.png", out / f"{stem}_overlay.png")
            if stem not in used and not any(p.resolve() in inputs for p in pair):
                break
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem)
        names.append(pair)
    return names


def _save_png(image, path: Path) -> None:
    """Write through a temporary file, so an interrupted run leaves no half-written PNG."""
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def predict_files(segmenter, files: list[Path], out: Path, *, alpha: float = 0.5) -> list[str]:
    """Predict each file and write its outputs; returns one error message per failed file."""
    from PIL import Image
    from tqdm import tqdm

    from fcn import viz
    from fcn.data.images import DataError
    from fcn.inference import read_input

    errors = []
    names = output_names(files, out)
    disable = True if len(files) < _PROGRESS_MIN_FILES else None  # None: only on a terminal
    for path, (classes_path, overlay_path) in tqdm(
        list(zip(files, names)), desc="predicting", unit="image", disable=disable, file=sys.stderr
    ):
        try:
            image_HWC = read_input(path)
            classes_HW = segmenter.predict(image_HWC)
            _save_png(viz.palette_image(classes_HW, segmenter.palette), classes_path)
            blend = viz.overlay(image_HWC, classes_HW, segmenter.palette, alpha, ignore_label=segmenter.ignore_label)
            _save_png(Image.fromarray(blend), overlay_path)
        except (DataError, OSError) as e:
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            errors.append(msg)
            tqdm.write(f"error: {msg}", file=sys.stderr)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py (or a checkpoint in it)")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--checkpoint", default="best", choices=("best", "latest"), help="which checkpoint")
    parser.add_argument("--hflip", action="store_true", help="average with horizontally flipped predictions")
    parser.add_argument("--tile", type=int, default=512, help="images larger than this are tiled (px)")
    parser.add_argument("--overlap", type=int, default=128, help="overlap between tiles (px)")
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in the overlay")
    args = parser.parse_args(argv)

    out = Path(args.out)
    files, errors = expand_inputs(args.images, out)
    for msg in errors:
        print(f"error: {msg}", file=sys.stderr)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file, not a directory", file=sys.stderr)
        return 1
    if not files:
        print("error: no images to predict", file=sys.stderr)
        return 1

    from fcn.checkpoint import CheckpointError
    from fcn.inference import load  # after argument checks: --help and errors stay fast

    try:
        options = dict(which=args.checkpoint, tile=args.tile, overlap=args.overlap)
        segmenter = load(args.workdir, **options, **({"hflip": True} if args.hflip else {}))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: cannot load {args.workdir}: {e}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    failed = predict_files(segmenter, files, out, alpha=args.alpha)
    print(
        f"wrote class maps and overlays of {len(files) - len(failed)} of {len(files)} images to {out}", file=sys.stderr
    )
    if errors or failed:
        n = len(errors) + len(failed)
        print(
            f"{n} input{'s' if n > 1 else ''} failed:",
            *(f"  {m}" for m in errors + failed),
            sep="\n",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
