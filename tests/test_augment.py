"""On-device augmentation (fcn.data.pipeline.augment): bilinear images, nearest-neighbour labels, flips, bounds."""

import jax
import ml_collections
import numpy as np
import pytest

from fcn.data import pipeline

IGNORE = 255


def settings(crop, scale=(1.0, 1.0), hflip=False, jitter=0.0):
    a = ml_collections.ConfigDict()
    a.crop_size, a.scale_range, a.hflip = crop, scale, hflip
    a.brightness = a.contrast = a.saturation = jitter
    return a


def batch(rng, b=3, h=13, w=17, sizes=None):
    """Random uint8 images and labels 0-4 on a canvas of h x w; `sizes` the true (H, W) of each."""
    images = rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (b, h, w), dtype=np.uint8)
    sizes = np.array(sizes or [(h, w)] * b, np.int32)
    return images, labels, sizes


def run(key, images, labels, sizes, settings):
    fn = jax.jit(lambda k, im, lab, s: pipeline.augment(k, im, lab, s, settings, IGNORE))
    x, y = fn(key, images, labels, sizes)
    return np.asarray(x), np.asarray(y)


def reference_bilinear(image_HWC, ys, xs):
    """Bilinear samples with coordinates clamped to the image, the textbook way, in float64."""
    h, w = image_HWC.shape[:2]
    img = image_HWC.astype(np.float64)
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
    return top * (1 - wy) + (img[y1, x0] * (1 - wx) + img[y1, x1] * wx) * wy


@pytest.mark.parametrize("h, w", [(13, 17), (2, 5), (1, 1), (1, 4)])
def test_bilinear_sampling_matches_the_textbook_formula(h, w):
    """Inside, on the borders and beyond them (clamped), for canvases down to one pixel."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ys = rng.uniform(-2.0, h + 1.0, (7, 11)).astype(np.float32)
    xs = rng.uniform(-2.0, w + 1.0, (7, 11)).astype(np.float32)
    ys[0, :4] = [0.0, h - 1, -0.5, h - 0.5]  # exactly on the first and last rows, and half a pixel out
    xs[1, :4] = [0.0, w - 1, -0.5, w - 0.5]
    got = np.asarray(jax.jit(pipeline._sample_bilinear)(image, ys, xs))
    np.testing.assert_allclose(got, reference_bilinear(image, ys, xs), rtol=0, atol=1e-3)


def test_unit_scale_full_crop_without_flip_or_jitter_is_the_identity():
    images, labels, sizes = batch(np.random.default_rng(1))
    x, y = run(jax.random.key(0), images, labels, sizes, settings((13, 17)))
    np.testing.assert_allclose(x, images / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y, labels)


def test_flip_mirrors_image_and_labels_together_and_both_happen():
    images, labels, sizes = batch(np.random.default_rng(2), b=8)
    x, y = run(jax.random.key(3), images, labels, sizes, settings((13, 17), hflip=True))
    flipped = [bool(np.array_equal(y[i], labels[i, :, ::-1])) for i in range(8)]
    for i, f in enumerate(flipped):
        source_x, source_y = (images[i, :, ::-1], labels[i, :, ::-1]) if f else (images[i], labels[i])
        np.testing.assert_allclose(x[i], source_x / 255.0, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(y[i], source_y)
    assert 0 < sum(flipped) < 8  # with this key, some of each


def test_labels_are_only_ever_copied_and_outside_is_ignored():
    """Random scales 0.5-2: every label comes from the source labels (nearest neighbour, never a
    blend of two classes); pixels outside the true image are the ignore label, black before the
    photometric jitter (which then moves them with the rest of the image)."""
    rng = np.random.default_rng(4)
    images, labels, sizes = batch(rng, b=6, h=20, w=24, sizes=[(20, 24), (11, 9), (20, 7), (5, 24), (20, 24), (3, 3)])
    for b, (h, w) in enumerate(sizes):
        labels[b, h:], labels[b, :, w:] = 7, 7  # the canvas's padding: never to be seen
    for seed, jitter in [(0, 0.0), (1, 0.0), (2, 0.3), (3, 0.3)]:
        settings_ = settings((16, 20), scale=(0.5, 2.0), hflip=True, jitter=jitter)
        x, y = run(jax.random.key(seed), images, labels, sizes, settings_)
        assert x.shape == (6, 16, 20, 3) and y.shape == (6, 16, 20) and y.dtype == np.int32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) <= {0, 1, 2, 3, 4, IGNORE}
        outside = y == IGNORE
        assert jitter or np.all(x[outside] == 0.0)
        assert outside[5].mean() > 0.5  # a 3 x 3 image covers at most 6 x 6 of the 16 x 20 crop
        assert not outside[0].all()


def test_scale_two_is_a_bilinear_upsampling_with_pixel_centres_on_pixel_centres():
    """scale_range (2, 2) and a crop of exactly twice the image: no offset is left to draw, so the
    crop is the whole image upsampled, output pixel i sampling source row (i + 0.5) / 2 - 0.5; each
    label is the nearest source pixel's."""
    images, labels, sizes = batch(np.random.default_rng(5), b=2, h=6, w=7)
    x, y = run(jax.random.key(0), images, labels, sizes, settings((12, 14), scale=(2.0, 2.0)))
    ys = np.broadcast_to(((np.arange(12) + 0.5) / 2 - 0.5)[:, None], (12, 14))
    xs = np.broadcast_to(((np.arange(14) + 0.5) / 2 - 0.5)[None, :], (12, 14))
    for i in range(2):
        np.testing.assert_allclose(x[i], reference_bilinear(images[i], ys, xs) / 255.0, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(y[i], labels[i][np.arange(12)[:, None] // 2, np.arange(14)[None, :] // 2])


def test_a_smaller_example_on_the_canvas_never_blends_in_its_padding():
    """An example smaller than the canvas (padded with zeros at its bottom and right), upsampled:
    its last row and column sampled past their centres keep their own values, as at the canvas's
    own edge, never mixed with the padding's black."""
    rng = np.random.default_rng(6)
    images, labels, sizes = batch(rng, b=2, h=10, w=12, sizes=[(5, 6), (10, 12)])
    images[0, 5:], images[0, :, 6:], labels[0, 5:], labels[0, :, 6:] = 0, 0, 7, 7  # the canvas's padding
    x, y = run(jax.random.key(0), images, labels, sizes, settings((10, 12), scale=(2.0, 2.0)))
    ys = np.broadcast_to(((np.arange(10) + 0.5) / 2 - 0.5)[:, None], (10, 12))
    xs = np.broadcast_to(((np.arange(12) + 0.5) / 2 - 0.5)[None, :], (10, 12))
    np.testing.assert_allclose(x[0], reference_bilinear(images[0, :5, :6], ys, xs) / 255.0, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(y[0], labels[0][np.arange(10)[:, None] // 2, np.arange(12)[None, :] // 2])


def test_every_label_is_the_label_of_the_image_pixel_it_lies_on():
    """Images whose red and green are their own row and column, labels a function of both: after
    any scale, crop offset, flip and size on a mixed canvas, each labelled pixel's image decodes to
    source coordinates whose label it carries (a tie, half way between two pixels, may go either
    way), inside its own example; the canvas's padding (label 14) is never seen; jitter changes no
    label."""
    f = lambda r, c: (r * 5 + c * 3) % 13  # noqa: E731
    sizes = np.array([(45, 61), (7, 5), (1, 9), (3, 1)], np.int32)
    images, labels = np.zeros((4, 45, 61, 3), np.uint8), np.full((4, 45, 61), 14, np.uint8)
    for b, (h, w) in enumerate(sizes):
        r, c = np.mgrid[:h, :w]
        images[b, :h, :w, 0], images[b, :h, :w, 1], labels[b, :h, :w] = r, c, f(r, c)
    for crop, seed in [((16, 20), 0), ((90, 3), 1), ((5, 70), 2)]:
        x, y = run(jax.random.key(seed), images, labels, sizes, settings(crop, scale=(0.3, 3.0), hflip=True))
        _, y_jittered = run(jax.random.key(seed), images, labels, sizes, settings(crop, (0.3, 3.0), True, 0.5))
        np.testing.assert_array_equal(y_jittered, y)
        assert set(np.unique(y)) <= set(range(13)) | {IGNORE}
        rows, cols = x[..., 0] * 255, x[..., 1] * 255
        tie = (np.abs(rows % 1 - 0.5) < 1e-3) | (np.abs(cols % 1 - 0.5) < 1e-3)
        labelled = y != IGNORE
        assert labelled[:3].any(axis=(1, 2)).all()  # a 3 x 1 image at scale 0.3 may cover no pixel centre
        r, c = np.round(rows).astype(int), np.round(cols).astype(int)
        assert np.all((f(r, c) == y)[labelled & ~tie])
        for b, (h, w) in enumerate(sizes):
            assert np.all(r[b][labelled[b]] < h) and np.all(c[b][labelled[b]] < w)


@pytest.mark.parametrize(
    "size, crop, scale, spans",
    [
        ((10, 12), (6, 8), 1.0, (4, 4)),
        ((4, 5), (7, 9), 1.0, (3, 4)),
        ((10, 12), (6, 8), 1.37, (8, 8)),  # 13.7 x 16.44: 14 x 16 pixel centres
        ((7, 7), (12, 13), 1.5, (2, 3)),  # 10.5 x 10.5: 10 x 10 pixel centres
    ],
)
def test_crops_take_every_placement_the_last_row_and_column_included(size, crop, scale, spans):
    """A crop slides over the rescaled image's pixels (as many as pixel centres inside it), or the
    image in the window, one whole pixel at a time: 0 .. span placements, its last row and column
    seen in the last, the image at the window's top left in the first. Each is drawn, nothing else."""
    (h, w), ch = size, crop[0]  # in each case both sides are larger than the crop, or both smaller
    r, c = np.mgrid[:h, :w]
    images = np.broadcast_to(np.stack([r, c, r], -1).astype(np.uint8), (128, h, w, 3))
    labels = np.zeros((128, h, w), np.uint8)
    sizes = np.full((128, 2), (h, w), np.int32)
    x, y = run(jax.random.key(0), images, labels, sizes, settings(crop, scale=(scale, scale)))
    found_y, found_x = set(), set()
    for b in range(128):
        if h * scale >= ch:  # the crop's first pixel samples source (p + 0.5) / scale - 0.5
            found_y.add(round((x[b, 0, 0, 0] * 255 + 0.5) * scale - 0.5))
            found_x.add(round((x[b, 0, 0, 1] * 255 + 0.5) * scale - 0.5))
        else:  # the window's row and column where the image starts
            rows, cols = np.nonzero(y[b] != IGNORE)
            found_y.add(int(rows.min()))
            found_x.add(int(cols.min()))
    assert found_y == set(range(spans[0] + 1)) and found_x == set(range(spans[1] + 1))
