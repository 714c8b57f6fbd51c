"""Pictures of segmentations: colourised class maps, overlays, legends, report figures.

matplotlib is imported only inside the functions that draw figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcn.inputs import read_input
from fcn.staging import write_atomic  # an interrupted evaluation leaves no half-written picture


def colorize(classes_HW: np.ndarray, palette_K3: np.ndarray, ignore_label: int | None = 255) -> np.ndarray:
    """uint8 [H, W, 3] colours of a class map; ignored (or unknown) pixels black; None ignores none."""
    palette = np.zeros((257, 3), np.uint8)  # row 256: ids outside 0..255, which uint8 would wrap onto classes
    palette[: len(palette_K3)] = palette_K3
    if ignore_label is not None:  # palette[None] = 0 would black out every row
        palette[ignore_label] = 0
    classes = np.asarray(classes_HW)
    if classes.dtype != np.uint8:
        classes = np.where((classes >= 0) & (classes < 256), classes, 256).astype(np.intp)
    return palette[classes]


def _rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] of an image read as Segmenter.predict reads it (fcn.inputs.read_input): a file path,
    a PIL image of any 8-bit mode, or an array [H, W(, 1, 3 or 4)] of uint8, integers in 0..255 or floats
    in [0, 1]; anything else is a DataError naming it (np.asarray alone drew a palette image's indices
    as gray, a float image in 0..255 white, and raised an IndexError for a path)."""
    image = read_input(image)
    if image.dtype != np.uint8:  # float32 in [0, 1]
        image = (image * 255).round().astype(np.uint8)
    return image


def _class_map(classes_HW, image_HWC: np.ndarray) -> np.ndarray:
    """classes_HW as an array, of the image's [H, W]: else a ValueError naming both shapes (numpy's
    broadcast or concatenate error named neither argument)."""
    classes_HW = np.asarray(classes_HW)
    h, w = image_HWC.shape[:2]
    if classes_HW.shape != (h, w):
        raise ValueError(
            f"a class map of shape {classes_HW.shape} for an image of {h}x{w}: expected [H, W] = ({h}, {w}) "
            "of class ids (of probabilities [H, W, K], take the argmax over the last axis)"
        )
    return classes_HW


def overlay(
    image_HWC: np.ndarray,
    classes_HW: np.ndarray,
    palette_K3: np.ndarray,
    alpha: float = 0.5,
    ignore_label: int | None = None,
) -> np.ndarray:
    """The image (a path, PIL image or array, as Segmenter.predict takes it) blended with the colourised
    class map; `ignore_label` pixels keep the image."""
    if not 0 <= alpha <= 1:  # outside, the blend leaves 0..255 and wraps around in uint8
        raise ValueError(f"alpha={alpha}: expected an opacity between 0 and 1")
    image = _rgb(image_HWC)
    classes_HW = _class_map(classes_HW, image)
    image = image.astype(np.float32)
    colours = colorize(classes_HW, palette_K3).astype(np.float32)
    out = image * (1 - alpha) + colours * alpha
    if ignore_label is not None:
        out = np.where((classes_HW == ignore_label)[..., None], image, out)
    return out.round().astype(np.uint8)


def palette_image(classes_HW: np.ndarray, palette_K3: np.ndarray) -> Image.Image:
    """A palette ('P' mode) PNG-ready image: stores class ids, opens as colours."""
    img = Image.fromarray(np.asarray(classes_HW, np.uint8), mode="P")
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(palette_K3)] = palette_K3
    img.putpalette(flat.ravel().tolist())
    return img


def _legend_palette(class_names, palette_K3) -> np.ndarray:
    """palette_K3 as an array with a colour for each class name: else a ValueError naming both lengths (legend
    raised numpy's IndexError, plot_examples' legend left the classes past the palette out)."""
    palette_K3 = np.asarray(palette_K3)
    if len(palette_K3) < len(class_names):
        raise ValueError(
            f"a palette of {len(palette_K3)} colours for {len(class_names)} class names: expected a colour "
            f"[r, g, b] for each class (fcn.data.default_palette({len(class_names)}) makes one)"
        )
    return palette_K3


def legend(class_names, palette_K3: np.ndarray, *, width: int = 160, row: int = 18) -> np.ndarray:
    """uint8 image of colour swatches with class names; wider than `width` where a name needs it.

    A palette with fewer colours than class names is a ValueError naming both lengths."""
    class_names = list(class_names)
    palette_K3 = _legend_palette(class_names, palette_K3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([width, *(row + 10 + int(np.ceil(measure.textlength(str(n)))) for n in class_names)])
    img = Image.new("RGB", (width, row * len(class_names) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, name in enumerate(class_names):
        y = 2 + k * row
        draw.rectangle([4, y, 4 + row - 4, y + row - 4], fill=tuple(int(c) for c in palette_K3[k]))
        draw.text((row + 6, y + 1), str(name), fill=(0, 0, 0))
    return np.asarray(img)


def side_by_side(image_HWC, label_HW, pred_HW, palette_K3, ignore_label: int = 255) -> np.ndarray:
    """image | ground truth | prediction, as one uint8 image (image | prediction without a label)."""
    image_HWC = _rgb(image_HWC)
    gap = np.full((image_HWC.shape[0], 4, 3), 255, np.uint8)
    label = [] if label_HW is None else [colorize(_class_map(label_HW, image_HWC), palette_K3, ignore_label)]
    panels = [image_HWC, *label, colorize(_class_map(pred_HW, image_HWC), palette_K3)]
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)


def save_examples(path, examples, class_names, palette_K3, ignore_label: int = 255) -> None:
    """Rows of image | ground truth | prediction with a class legend at the right."""
    rows = [side_by_side(i, lab, p, palette_K3, ignore_label) for i, lab, p in examples]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    grid = np.concatenate(rows, axis=0)
    leg = legend(class_names, palette_K3)
    height = max(grid.shape[0], leg.shape[0])
    grid = np.pad(grid, ((0, height - grid.shape[0]), (0, 0), (0, 0)), constant_values=255)
    leg = np.pad(leg, ((0, height - leg.shape[0]), (0, 0), (0, 0)), constant_values=255)
    picture = Image.fromarray(np.concatenate([grid, leg], axis=1))
    write_atomic(Path(path), lambda tmp: picture.save(tmp, format="PNG"))


def plot_examples(examples, class_names, palette_K3, ignore_label: int = 255, *, size: float = 2.5):
    """A matplotlib figure, one row per (image, label or None, prediction): titled panels, a legend.

    For notebooks; returns the Figure (close it with `plt.close(fig)` when saving many).
    """
    class_names = list(class_names)
    palette_K3 = _legend_palette(class_names, palette_K3)
    plt = _pyplot()
    from matplotlib.patches import Patch

    examples = list(examples)
    cols = 3 if any(lab is not None for _, lab, _ in examples) else 2
    figsize = (size * cols * 1.3, size * len(examples))
    fig, axes = plt.subplots(len(examples), cols, figsize=figsize, squeeze=False)
    for row, (image, label, pred) in zip(axes, examples):
        panels = [("image", _rgb(image)), ("prediction", colorize(pred, palette_K3))]
        if cols == 3:
            blank = np.full_like(panels[0][1], 255)
            truth = blank if label is None else colorize(label, palette_K3, ignore_label)
            panels.insert(1, ("ground truth", truth))
        for ax, (title, picture) in zip(row, panels):
            ax.imshow(picture, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [Patch(color=np.asarray(c) / 255.0, label=str(n)) for n, c in zip(class_names, palette_K3)]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig


def _pyplot():
    import matplotlib

    # A script: no window. A notebook (or IPython) keeps its backend, pyplot imported or not: its kernel
    # names the inline backend in MPLBACKEND, which Agg replaced for the rest of the session.
    if "matplotlib.pyplot" not in sys.modules and not _in_ipython():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_ipython() -> bool:
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


def _save(fig, path: str | Path) -> None:
    """Save a report figure and close it. Cropped to what is drawn (bbox_inches="tight"), not laid out to a
    fixed size: tight_layout cut long class names off the confusion matrix and squeezed the IoU bars to
    fit them."""
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight"))
    _pyplot().close(fig)


def save_confusion(path: str | Path, cm_KK: np.ndarray, class_names) -> None:
    """Row-normalised confusion matrix heatmap (rows: ground truth)."""
    plt = _pyplot()
    rows = cm_KK.sum(axis=1, keepdims=True)
    norm = np.divide(cm_KK, rows, out=np.zeros(cm_KK.shape, np.float64), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * k, 1 + 0.5 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90)
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    for i in range(k):
        for j in range(k):
            if norm[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{100 * norm[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    _save(fig, path)


def save_iou_bars(path: str | Path, report: dict) -> None:
    """Per-class IoU bar chart with the mean IoU as a line.

    A class absent from both ground truth and prediction (IoU None, left out of the mean) gets no
    bar but "n/a", not a bar of 0 as a class predicted but never right gets.
    """
    plt = _pyplot()
    names = [c["name"] for c in report["per_class"]]
    scored = [(k, 100 * c["iou"]) for k, c in enumerate(report["per_class"]) if c["iou"] is not None]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * len(names), 3.5))
    ax.bar([k for k, _ in scored], [v for _, v in scored], color="tab:blue")
    for k in sorted(set(range(len(names))) - {k for k, _ in scored}):
        ax.text(k, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="gray")
    if report["mean_iou"] is not None:
        ax.axhline(
            100 * report["mean_iou"], color="tab:red", linestyle="--", label=f"mean {100 * report['mean_iou']:.1f}"
        )
        ax.legend()
    ax.set_xticks(range(len(names)), names, rotation=90)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    _save(fig, path)
