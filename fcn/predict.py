"""Predict class maps for image files with a trained workdir.

    python -m fcn.predict --workdir runs/camvid_cpu --out preds/ street.jpg more/ ...

For each input image `NAME.ext` it writes `OUT/NAME_classes.png`, the class ids
as a palette PNG (it opens as colours; the pixel values are the class ids),
and `OUT/NAME_overlay.png`, the image blended with those colours. Where that
name is an earlier input's (`a/x.png` and `b/x.jpg`) or would overwrite an
input, the later input's outputs are `NAME-2_...` (`-3`, ...), and a note
says which file they belong to. Names are compared ignoring case (`a/IMG.png`
and `b/img.jpg` too), as macOS and Windows file systems compare them. A
directory argument stands for the images directly inside it (other files there
are passed over). Inputs are only read, never written. Inputs that cannot be
used (missing, not an image, empty, a directory without images or that cannot
be listed) are reported by name and skipped; the exit code is 0 when every
input was predicted, 1 when some failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcn import trained
from fcn.cli import exits_130_on_ctrl_c, out_dir_error, out_of_memory
from fcn.staging import write_atomic

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_PROGRESS_MIN_FILES = 2  # a bar for a single file is noise


def _is_output(path: Path) -> bool:
    return path.name.endswith(("_classes.png", "_overlay.png"))


def expand_inputs(args: list[str], out: Path | None = None) -> tuple[list[Path], list[str]]:
    """(image files, error messages) from file and directory arguments, in order, without repeats.

    A directory gives its image files, not its hidden ones nor its subfolders'; one that is also
    `out` contributes no earlier outputs of ours, and is no error when it holds no other image (or none).
    """
    files: list[Path] = []
    errors: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            try:
                # Hidden files are no images (macOS's `._x.png` metadata), as in the folder source.
                found = sorted(
                    p
                    for p in path.iterdir()
                    if not p.name.startswith(".") and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
            except OSError as e:  # no permission to list it, say: the other inputs are still predicted
                errors.append(f"{path}: cannot list directory ({e.strerror or e})")
                continue
            ours = out is not None and out.exists() and path.resolve() == out.resolve()
            if ours:  # `--out frames/preds frames/*`: earlier outputs only, or none yet, is no failed input
                found = [p for p in found if not _is_output(p)]
            elif not found:
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


def _folded(path: Path) -> str:
    """A path as a case-insensitive file system (macOS, Windows) tells it apart: `X.png` is `x.png` there."""
    return str(path.resolve()).casefold()


def output_names(files: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(class map path, overlay path) per input: unique, and never an input path, ignoring case."""
    inputs = {_folded(p) for p in files}
    used: set[str] = set()
    names = []
    for path in files:
        stem, n = path.stem, 1
        while True:
            pair = (out / f"{stem}_classes.png", out / f"{stem}_overlay.png")
            if stem.casefold() not in used and not any(_folded(p) in inputs for p in pair):
                break
            n += 1
            stem = f"{path.stem}-{n}"
        used.add(stem.casefold())
        names.append(pair)
    return names


def _save_png(image, path: Path, compress_level: int = 6) -> None:
    """Write through a temporary file, so an interrupted run leaves no half-written PNG."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", compress_level=compress_level))


def predict_files(segmenter, files: list[Path], out: Path, *, alpha: float = 0.5, workers: int = 4) -> list[str]:
    """Predict each file and write its outputs; returns one error message per failed file, in order.

    The model predicts `segmenter.batch_size` images per call while `workers` threads read the
    next images and encode and write the finished ones (PIL leaves Python's lock while it
    decodes and encodes): on a CPU the files' work took about as long as the model's
    (docs/benchmarks.md, the twenty-third session). At most two batches wait on each side.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from fcn import viz
    from fcn.data.images import DataError
    from fcn.inputs import read_input
    from fcn.progress import progress_bar

    names = output_names(files, out)
    for path, (classes_path, overlay_path) in zip(files, names, strict=True):
        if classes_path.name != f"{path.stem}_classes.png":  # else no one could tell which file it was
            print(
                f"note: {path} is written as {classes_path.name} and {overlay_path.name} "
                f"({path.stem}_classes.png is another input's, or an input)",
                file=sys.stderr,
            )
    errors: dict[int, str] = {}
    ahead = 2 * segmenter.batch_size
    disable = len(files) < _PROGRESS_MIN_FILES
    bar = progress_bar(total=len(files), desc="predicting", unit="image", disable=disable, file=sys.stderr)

    def report(i: int, e: Exception) -> None:
        """File i failed: say so now, list it at the end, count it as done."""
        msg = str(e) if str(files[i]) in str(e) else f"{files[i]}: {e}"
        errors[i] = msg
        bar.write(f"error: {msg}", file=sys.stderr)
        bar.update(1)

    def settle(i: int, future):
        """File i's read or write, waited for; None when it failed."""
        try:
            return future.result()
        except (DataError, OSError) as e:
            report(i, e)
            return None

    def write(i: int, image_HWC, classes_HW) -> None:
        classes_path, overlay_path = names[i]
        _save_png(viz.palette_image(classes_HW, segmenter.palette), classes_path)
        blend = viz.overlay(image_HWC, classes_HW, segmenter.palette, alpha, ignore_label=segmenter.ignore_label)
        # zlib's fastest level: a CamVid overlay took 19 ms and 244 KiB, against 71 ms and 229 KiB
        # at PIL's default (6), more than the model's own time for it on a CPU.
        _save_png(Image.fromarray(blend), overlay_path, compress_level=1)
        bar.update(1)

    with bar, ThreadPoolExecutor(workers, thread_name_prefix="fcn-predict-io") as pool:
        todo = iter(range(len(files)))
        reads: deque = deque()
        writes: deque = deque()
        while True:
            while len(reads) < ahead and (i := next(todo, None)) is not None:
                reads.append((i, pool.submit(read_input, files[i])))
            if not reads:
                break
            batch = []
            while reads and len(batch) < segmenter.batch_size:
                i, future = reads.popleft()
                image_HWC = settle(i, future)
                if image_HWC is not None:
                    batch.append((i, image_HWC))
            for (i, image_HWC), classes_HW in zip(batch, _predicted(segmenter, batch, report), strict=True):
                if classes_HW is not None:
                    writes.append((i, pool.submit(write, i, image_HWC, classes_HW)))
            while len(writes) > ahead:
                settle(*writes.popleft())
        while writes:
            settle(*writes.popleft())
    return [errors[i] for i in sorted(errors)]


def _predicted(segmenter, batch: list, report) -> list:
    """Class maps of a batch's images in one call; image by image when the batch fails, so
    that a failure names its own file (`report(i, error)`, then None for it)."""
    from fcn.data.images import DataError

    if not batch:  # every read in it failed: an empty batch is an error to the predictor
        return []
    try:
        return segmenter.predict([image_HWC for _, image_HWC in batch])
    except DataError:
        maps = []
        for i, image_HWC in batch:
            try:
                maps.append(segmenter.predict(image_HWC))
            except DataError as e:
                report(i, e)
                maps.append(None)
        return maps


@exits_130_on_ctrl_c()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fcn.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of images")
    trained.add_flags(parser)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--hflip", action="store_true", help=trained.HFLIP_HELP)
    parser.add_argument(
        "--tile",
        type=int,
        default=512,
        help="images with a side over this are tiled (px, rounded down to a multiple of 2**depth: the model's)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=128,
        help="overlap between tiles (px, rounded up to a multiple of 2**depth, less than the tile)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the colours in the overlay")
    args = parser.parse_args(argv)
    if not 0 <= args.alpha <= 1:
        parser.error(f"--alpha={args.alpha:g}: expected an opacity between 0 and 1")
    if args.tile < 1 or args.overlap < 0:  # the predictor would quietly take 2**depth, or no overlap
        parser.error(
            f"--tile={args.tile} --overlap={args.overlap}: expected a tile of 1 px or more, an overlap of 0 or more"
        )

    out = Path(args.out)
    files, errors = expand_inputs(args.images, out)
    for msg in errors:
        print(f"error: {msg}", file=sys.stderr)
    if problem := out_dir_error(args.out):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    if not files:
        print("error: no images to predict", file=sys.stderr)
        return 1

    from fcn.checkpoint import CheckpointError
    from fcn.inference import load  # after argument checks: --help and errors stay fast
    from fcn.traced import enable_compilation_cache

    enable_compilation_cache()  # a second run reads the compiled model back
    try:
        options = dict(which=args.checkpoint, tile=args.tile, overlap=args.overlap)
        segmenter = load(args.workdir, **options, **({"hflip": True} if args.hflip else {}))
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        print(f"error: cannot load {args.workdir}: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        return _out_of_memory(e, args)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot make --out {out}: {e}", file=sys.stderr)
        return 1
    try:
        failed = predict_files(segmenter, files, out, alpha=args.alpha)
    except RuntimeError as e:
        return _out_of_memory(e, args)
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


def _out_of_memory(e: RuntimeError, args) -> int:
    """XLA's out-of-memory error in one line, with the flag that takes less (exit code 1); any other, raised on."""
    if (oom := out_of_memory(e)) is None:
        raise e
    print(
        f"error: {oom} predicting with {args.workdir}; to use less memory try --tile={max(1, args.tile // 2)} "
        f"(now {args.tile}: images and tiles of up to {args.tile} x {args.tile} px, a few at a time)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
