"""Pictures: colours, overlays, palette PNGs, legends, side-by-side figures."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn import viz

PALETTE = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
CLASSES = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
NAMES = ("background", "red", "green")


def test_colorize_uses_the_palette_and_blacks_out_ignored_pixels():
    colours = viz.colorize(CLASSES, PALETTE)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0], PALETTE)
    np.testing.assert_array_equal(colours[1, 1], [0, 0, 0])


def test_overlay_blends_and_keeps_the_image_where_ignored():
    image = np.full((2, 3, 3), 100, np.uint8)
    np.testing.assert_array_equal(viz.overlay(image, CLASSES, PALETTE, alpha=0.0), image)
    np.testing.assert_array_equal(viz.overlay(image, CLASSES, PALETTE, alpha=1.0), viz.colorize(CLASSES, PALETTE))
    half = viz.overlay(image, CLASSES, PALETTE, alpha=0.5, ignore_label=255)
    np.testing.assert_array_equal(half[0, 1], [178, 50, 50])
    np.testing.assert_array_equal(half[1, 1], [100, 100, 100])
    # Grayscale and [0, 1] float images are drawn too.
    assert viz.overlay(image[..., 0], CLASSES, PALETTE).shape == (2, 3, 3)
    np.testing.assert_array_equal(viz.overlay(image / 255.0, CLASSES, PALETTE), viz.overlay(image, CLASSES, PALETTE))


def test_palette_png_stores_class_ids_and_opens_as_colours(tmp_path):
    path = tmp_path / "classes.png"
    viz.palette_image(CLASSES, PALETTE).save(path)
    reopened = Image.open(path)
    assert reopened.mode == "P"
    np.testing.assert_array_equal(np.asarray(reopened), CLASSES)
    np.testing.assert_array_equal(np.asarray(reopened.convert("RGB"))[0], PALETTE)


def test_legend_has_one_swatch_row_per_class():
    legend = viz.legend(NAMES, PALETTE)
    assert legend.shape == (18 * 3 + 4, 160, 3)
    np.testing.assert_array_equal(legend[2 + 18 + 5, 8], PALETTE[1])


def test_a_palette_shorter_than_the_class_names_is_refused_naming_both_lengths():
    """legend raised numpy's IndexError (naming neither argument) for a class past the palette, and
    plot_examples' legend silently left those classes out."""
    names = (*NAMES, "blue")
    image = np.zeros((2, 3, 3), np.uint8)
    for call in (
        lambda: viz.legend(names, PALETTE),
        lambda: viz.plot_examples([(image, None, CLASSES)], names, PALETTE),
    ):
        with pytest.raises(ValueError, match="a palette of 3 colours for 4 class names"):
            call()
    assert viz.legend(NAMES[:2], PALETTE).shape == (18 * 2 + 4, 160, 3)  # a longer palette is fine


def test_side_by_side_panels():
    image = np.zeros((2, 3, 3), np.uint8)
    assert viz.side_by_side(image, CLASSES, CLASSES, PALETTE).shape == (2, 3 * 3 + 8, 3)
    assert viz.side_by_side(image, None, CLASSES, PALETTE).shape == (2, 2 * 3 + 4, 3)


def test_save_examples_and_plot_examples(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    pred = np.random.default_rng(1).integers(0, 3, (8, 10)).astype(np.uint8)
    viz.save_examples(tmp_path / "examples.png", [(image, pred, pred)] * 2, NAMES, PALETTE)
    assert Image.open(tmp_path / "examples.png").size[1] >= 2 * 8
    fig = viz.plot_examples([(image, pred, pred), (image, None, pred)], NAMES, PALETTE)
    assert len(fig.axes) == 6 and [a.get_title() for a in fig.axes[:3]] == ["image", "ground truth", "prediction"]
    fig = viz.plot_examples([(image, None, pred)], NAMES, PALETTE)
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close("all")


def test_pictures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """evaluate's pictures go through a temporary file: an interrupt while one is written leaves the
    earlier picture as it was and no temporary file (they were written in place)."""
    image = np.zeros((8, 10, 3), np.uint8)
    path = tmp_path / "examples.png"
    pred = np.ones((8, 10), np.uint8)
    viz.save_examples(path, [(image, pred, pred)], NAMES, PALETTE)
    before = path.read_bytes()
    report = {"per_class": [{"name": n, "iou": 0.5} for n in NAMES], "mean_iou": 0.5}
    viz.save_iou_bars(tmp_path / "iou.png", report)
    iou_before = (tmp_path / "iou.png").read_bytes()

    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        viz.save_examples(path, [(image, None, 2 * pred)], NAMES, PALETTE)
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        viz.save_iou_bars(tmp_path / "iou.png", report)
    assert path.read_bytes() == before and (tmp_path / "iou.png").read_bytes() == iou_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples.png", "iou.png"]


def test_iou_bars_mark_a_class_absent_from_truth_and_prediction_not_as_zero(tmp_path, monkeypatch):
    """A class with no IoU (absent from both ground truth and prediction, left out of the mean) was
    drawn as a bar of 0, as if it had been predicted and never right."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    per_class = [{"name": "a", "iou": 0.5}, {"name": "b", "iou": None}, {"name": "c", "iou": 0.0}]
    viz.save_iou_bars(tmp_path / "iou.png", {"per_class": per_class, "mean_iou": 0.25})
    assert Image.open(tmp_path / "iou.png").format == "PNG"
    (ax,) = figures[0].axes
    bars = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
    assert bars == {0: 50.0, 2: 0.0}
    assert [(t.get_position()[0], t.get_text()) for t in ax.texts] == [(1, "n/a")]
    monkeypatch.undo()
    plt.close("all")


def test_images_are_read_as_predict_reads_them(tmp_path):
    """overlay, side_by_side and plot_examples took images by np.asarray alone: a path raised an IndexError,
    a palette PIL image was drawn as gray indices, CMYK as inverted colours, a '1' image and a 16-bit one
    (wrapped) black or wrong, a float one in 0..255 all white. They read them as Segmenter.predict does."""
    from fcn.data.images import DataError
    from fcn.inputs import read_input

    rgb = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "image.png")
    pil = Image.fromarray(rgb)
    for image in (
        tmp_path / "image.png",
        str(tmp_path / "image.png"),
        pil,
        pil.convert("P"),
        pil.convert("CMYK"),
        pil.convert("LA"),
        pil.convert("1"),
        rgb.astype(np.uint16),
        rgb / 255.0,
    ):
        expected = read_input(image)
        expected = expected if expected.dtype == np.uint8 else (expected * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(viz.overlay(image, CLASSES, PALETTE, alpha=0.0), expected)
        assert viz.side_by_side(image, CLASSES, CLASSES, PALETTE)[:, :3].tolist() == expected.tolist()
    for bad, words in [
        (rgb.astype(np.float32), "float images must be in [0, 1] (divide 0..255 by 255)"),
        (rgb.astype(np.uint16) * 257, "uint16 values in"),
        (tmp_path / "missing.png", "missing.png"),
    ]:
        with pytest.raises(DataError, match=None) as info:
            viz.overlay(bad, CLASSES, PALETTE)
        assert words in str(info.value)


def test_class_ids_past_the_palettes_256_entries_are_black_not_wrapped():
    """colorize says unknown pixels are black: a class map of int32 ids 257 or -255 was cast to uint8
    and drawn in class 1's colour."""
    classes = np.array([[1, 257, -255, 300]], np.int32)
    np.testing.assert_array_equal(viz.colorize(classes, PALETTE), [[PALETTE[1], [0, 0, 0], [0, 0, 0], [0, 0, 0]]])
    # ignore_label=None ignores nothing: it blacked out every class (palette[None] = 0 set every row)
    np.testing.assert_array_equal(viz.colorize(CLASSES[0], PALETTE, ignore_label=None), PALETTE)


def test_a_class_map_not_of_the_images_size_is_refused_naming_both():
    """A class map of another size (a label of the unshrunk image, probabilities [H, W, K] for their argmax)
    raised numpy's "operands could not be broadcast" from overlay, and from side_by_side its concatenate's."""
    image = np.zeros((2, 3, 3), np.uint8)
    probs = np.zeros((2, 3, 3), np.float32)
    for call in (
        lambda: viz.overlay(image, CLASSES[:1], PALETTE),
        lambda: viz.overlay(image, probs, PALETTE),
        lambda: viz.side_by_side(image, CLASSES, CLASSES[:, :2], PALETTE),
        lambda: viz.side_by_side(image, CLASSES.T, CLASSES, PALETTE),
    ):
        with pytest.raises(ValueError, match=r"class map of shape \(.*\) for an image of 2x3: expected \[H, W\]"):
            call()


def _border_is_white(path, width: int = 2, *, right_only: bool = False) -> bool:
    """Whether the picture's outer `width` pixels (or its right edge's) are all white: nothing drawn runs off."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    edges = [rgb[:, -width:]] + ([] if right_only else [rgb[:width], rgb[-width:], rgb[:, :width]])
    return all((e >= 250).all() for e in edges)


def test_long_class_names_are_drawn_whole_and_leave_the_plots_their_size(tmp_path):
    """A class named `a_very_long_class_name_for_alignment` was cut: at the examples legend's 160 px and at the
    edges of the confusion matrix (matplotlib warned "Tight layout not applied"), and the IoU chart's layout
    squeezed its bars into 20 px to fit the rotated name. Now each picture holds every name whole (nothing runs
    off its edges) and the IoU chart's bars keep the height they have with short names."""
    long_names = ["background", "a_very_long_class_name_for_alignment", "object"]
    image = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    pred = np.ones((8, 10), np.uint8)
    viz.save_examples(tmp_path / "examples.png", [(image, pred, pred)], long_names, PALETTE)
    viz.save_confusion(tmp_path / "confusion.png", np.array([[5, 1, 0], [2, 7, 1], [0, 0, 9]]), long_names)
    assert _border_is_white(tmp_path / "examples.png", right_only=True)  # the legend's side; images fill the rest
    assert _border_is_white(tmp_path / "confusion.png")

    def bar_height(names) -> int:  # the pixels of a 100% bar, in tab:blue
        viz.save_iou_bars(tmp_path / "iou.png", {"per_class": [{"name": n, "iou": 1.0} for n in names], "mean_iou": 1})
        rgb = np.asarray(Image.open(tmp_path / "iou.png").convert("RGB")).astype(int)
        blue = (np.abs(rgb - [31, 119, 180]).sum(-1) < 30).any(axis=1)
        assert _border_is_white(tmp_path / "iou.png")
        return int(blue.sum())

    assert bar_height(long_names) >= 0.9 * bar_height(NAMES) > 100
