"""The trained predictor: inputs of every kind, exact bucketing, bounded compilations, tiling."""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from configs import tiny
from fcn import canvas
from fcn.data.images import DataError
from fcn.data.synthetic import make_example
from fcn.inference import Segmenter, load
from fcn.model import UNet

_RUN: dict = {}


def train_tiny(tmp_path_factory) -> str:
    """A workdir trained on configs/tiny.py, once per session (shared by the inference test files).

    Training uses the usual persistent compilation cache, so a second session trains in seconds.
    """
    if "workdir" not in _RUN:
        from fcn.train import train_and_evaluate

        workdir = tmp_path_factory.mktemp("tiny_run")
        train_and_evaluate(tiny.get_config(), workdir)
        _RUN["workdir"] = str(workdir)
    return _RUN["workdir"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def seg(workdir):
    return load(workdir, bucket=32, tile=64, overlap=32)


def reference_proba(seg, image_HWC):
    """Softmax of the plain model on the unpadded image: what every path must reproduce."""
    x = np.asarray(image_HWC, np.float32)[None] / (255.0 if image_HWC.dtype == np.uint8 else 1.0)
    graphdef, state = nnx.split(seg.model)
    proba = jax.jit(lambda state, x: jax.nn.softmax(nnx.merge(graphdef, state)(x), axis=-1))
    return np.asarray(proba(state, x)[0])


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_load_carries_classes_palette_and_predicts(workdir, seg):
    image = random_image(30, 41)
    classes = seg.predict(image)
    probs = seg.predict_proba(image)
    assert seg.class_names == ("background", "circle", "square", "triangle")
    assert seg.palette.shape == (4, 3) and seg.palette.dtype == np.uint8
    assert classes.shape == (30, 41) and classes.dtype == np.uint8
    assert probs.shape == (30, 41, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(classes, probs.argmax(-1))


def test_load_one_checkpoint_folder(workdir):
    image = random_image(20, 20)
    latest = load(os.path.join(workdir, "checkpoints", "6"))
    np.testing.assert_allclose(latest.predict_proba(image), load(workdir, which="latest").predict_proba(image))


def test_a_workdir_without_checkpoints_is_one_clear_error_and_stays_as_it_was(workdir, tmp_path):
    """A run stopped before its first save (config.json and dataset.json, no checkpoint folders):
    loading or evaluating it names what is missing, and creates no folder in it."""
    from fcn import trained
    from fcn.checkpoint import CheckpointError

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "dataset.json"):
        shutil.copy(os.path.join(workdir, name), bare / name)
    (bare / "checkpoints").mkdir()  # made at the start of training, empty until the first save
    for read in (load, trained.restore):  # fcn.load, and fcn.evaluate's reader
        with pytest.raises(CheckpointError, match=r"no latest checkpoint in .*bare: its checkpoints/ folder is"):
            read(bare)
    assert sorted(p.name for p in bare.iterdir()) == ["checkpoints", "config.json", "dataset.json"]
    assert not any((bare / "checkpoints").iterdir())


def test_bucketed_prediction_equals_unpadded(seg):
    for h, w in [(1, 1), (13, 7), (33, 64)]:
        image = random_image(h, w, seed=h)
        np.testing.assert_allclose(seg.predict_proba(image), reference_proba(seg, image), atol=1e-5)


def test_compilations_bounded_over_20_random_sizes(workdir):
    seg = load(workdir, bucket=32, tile=64)
    sizes = np.random.default_rng(1).integers(1, 65, size=(20, 2))
    for h, w in sizes:
        assert seg.predict(random_image(h, w)).shape == (h, w)
    # Canvases are multiples of 32 up to the 64 px tile (at most 2 x 2 shapes), but for the first
    # `exact_sizes` (4) sizes, which get their own.
    assert seg.compilations <= 4 + seg.exact_sizes < len({tuple(s) for s in sizes})
    before = seg.compilations
    seg.predict([random_image(h, w) for h, w in sizes[:3]])
    assert seg.compilations - before <= 2  # at most a new batch size, never a new image size


def test_the_first_sizes_get_canvases_of_their_own_size(workdir):
    seg = load(workdir, bucket=32, tile=64, exact_sizes=1)
    m = seg.multiple
    first, second = random_image(m + 3, 2 * m + 1, seed=1), random_image(m + 5, m + 2, seed=2)
    on_a_bucket = random_image(32, 32, seed=3)  # its own size is a bucket's: it takes no place
    for image in (on_a_bucket, first, second, first):
        np.testing.assert_allclose(seg.predict_proba(image), reference_proba(seg, image), atol=1e-5)
    # The first size got its own padded size; the second, past exact_sizes, the 32 px bucket that
    # the first image compiled already.
    assert [s[1:3] for s in seg.traced_shapes] == [(32, 32), (2 * m, 3 * m)]
    assert m + 5 <= 32 and seg._canvas(*second.shape[:2]) == (32, 32)


def test_tiled_matches_whole_image_in_bounded_tiles(workdir, seg):
    image, _ = make_example(7, 0, (150, 230))
    whole = load(workdir, tile=256).predict_proba(image)
    np.testing.assert_allclose(whole, reference_proba(seg, image), atol=1e-5)
    n = seg.compilations
    tiled = seg.predict_proba(image)
    assert np.abs(tiled - whole).max() < 0.05
    assert (tiled.argmax(-1) == whole.argmax(-1)).mean() > 0.99
    # Memory is bounded by one tile batch: no call ever saw more than batch_size tiles of 64 x 64.
    assert seg.traced_shapes[n:] and all(s[0] <= seg.batch_size and max(s[1:3]) <= 64 for s in seg.traced_shapes)


def test_tiles_cover_the_image_and_blending_keeps_agreeing_logits():
    # 150 x 230 in 64-px tiles overlapping by 32 px, origins on multiples of 16.
    boxes = canvas.tile_boxes(150, 230, 64, 32, 16)
    assert all(y % 16 == 0 and x % 16 == 0 for y, x in boxes)
    covered = np.zeros((150, 230), bool)
    for y, x in boxes:
        covered[y : y + 64, x : x + 64] = True
    assert covered.all()
    assert max(y for y, _ in boxes) + 64 - 150 < 16 and max(x for _, x in boxes) + 64 - 230 < 16
    # Tiles that agree blend to the same logits; one tile counts everywhere it covers, in part where others do too.
    tile = np.full((64, 64, 2), 3.0, np.float32)
    agreed = canvas.blend(boxes, (tile[: 150 - y, : 230 - x] for y, x in boxes), (150, 230, 2), 32)
    np.testing.assert_allclose(agreed, 3.0, rtol=1e-6)
    alone = [
        np.full((min(64, 150 - y), min(64, 230 - x), 1), float(i == 4), np.float32) for i, (y, x) in enumerate(boxes)
    ]
    share = canvas.blend(boxes, alone, (150, 230, 1), 32)[..., 0]
    inside = np.zeros((150, 230), bool)
    inside[boxes[4][0] : boxes[4][0] + 64, boxes[4][1] : boxes[4][1] + 64] = True
    assert (share[inside] > 0).all() and (share[~inside] == 0).all() and share.max() < 1


def test_blending_fades_linearly_from_one_tile_to_the_next_with_no_seam():
    """Across an overlap each tile's weight falls as the next one's rises: a tile of 0s then a tile of 1s
    blend to (i + 1) / (overlap + 1) at the overlap's i-th pixel, and each tile's own value outside it."""
    boxes = canvas.tile_boxes(16, 96, 64, 32, 16)
    assert boxes == [(0, 0), (0, 32)]
    tiles = [np.zeros((16, 64, 1), np.float32), np.ones((16, 64, 1), np.float32)]
    row = canvas.blend(boxes, tiles, (16, 96, 1), 32)[0, :, 0]
    np.testing.assert_allclose(row[32:64], np.arange(1, 33) / 33, rtol=1e-6)  # a seam: a jump at x = 64
    assert (row[:32] == 0).all() and (row[64:] == 1).all()


def test_tiles_overlap_less_than_a_tile_whatever_overlap_is_asked():
    """fcn.load(..., tile=64, overlap=64 or more) still tiles: an overlap of a whole tile gave a stride of 0."""
    assert canvas.tiles(70, 20, 16) == (64, 32)  # tile rounded down, overlap up, to multiples of 16
    for overlap in (64, 100):
        tile, kept = canvas.tiles(64, overlap, 16)
        assert (tile, kept) == (64, 48)
        boxes = canvas.tile_boxes(150, 230, tile, kept, 16)
        covered = np.zeros((150, 230), bool)
        for y, x in boxes:
            covered[y : y + tile, x : x + tile] = True
        assert covered.all()


def test_every_input_form_gives_the_same_answer(seg, tmp_path):
    image, _ = make_example(3, 0, (37, 45))
    expected = seg.predict(image)
    path = tmp_path / "image.png"
    Image.fromarray(image).save(path)
    assert np.array_equal(seg.predict(str(path)), expected)
    assert np.array_equal(seg.predict(path), expected)
    assert np.array_equal(seg.predict(Image.fromarray(image)), expected)
    assert np.array_equal(seg.predict(Image.fromarray(image).convert("RGBA")), expected)
    assert np.array_equal(seg.predict(np.dstack([image, np.full(image.shape[:2], 7, np.uint8)])), expected)
    assert np.array_equal(seg.predict(image.astype(np.int64)), expected)
    np.testing.assert_allclose(seg.predict_proba(image / 255.0), seg.predict_proba(image), atol=1e-5)
    gray = image[..., 0]
    assert np.array_equal(seg.predict(gray), seg.predict(np.repeat(gray[..., None], 3, -1)))
    assert np.array_equal(seg.predict(gray[..., None]), seg.predict(gray))
    batch = seg.predict([image, image[:20, :30], path])
    assert [b.shape for b in batch] == [(37, 45), (20, 30), (37, 45)]
    assert np.array_equal(batch[1], seg.predict(image[:20, :30]))
    assert seg.predict(np.stack([image, image[::-1]])).shape == (2, 37, 45)


def test_hflip_averages_with_the_mirror_image(seg):
    image, _ = make_example(4, 0, (40, 50))
    flip = seg.predict_proba(image, hflip=True)
    np.testing.assert_allclose(seg.predict_proba(image[:, ::-1], hflip=True)[:, ::-1], flip, atol=1e-5)
    assert not np.allclose(flip, seg.predict_proba(image), atol=1e-4)


@pytest.mark.parametrize("size", [(40, 50), (100, 130)], ids=["one canvas", "tiled"])
def test_hflip_is_the_softmax_of_the_mean_of_both_logits(seg, size):
    """As fcn.load documents hflip: the logits of the image and of its mirror, mirrored back, averaged,
    then softmaxed; for images within a tile (one batch) and beyond it (tiled, each pass blended).
    Log-probabilities are logits shifted per pixel, so the mean of theirs gives the same softmax."""
    image, _ = make_example(5, 0, size)
    assert (max(size) <= seg.tile) == (size == (40, 50))
    log_a = np.log(seg.predict_proba(image, hflip=False))
    log_b = np.log(seg.predict_proba(image[:, ::-1], hflip=False))[:, ::-1]
    mean = 0.5 * (log_a + log_b)
    want = np.exp(mean - mean.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(seg.predict_proba(image, hflip=True), want, atol=1e-5)


def test_max_size_predicts_at_training_scale(workdir):
    small = load(workdir, max_size=16)
    assert small.predict(random_image(40, 60)).shape == (40, 60)


def test_max_size_shrinks_a_uint8_image_as_the_data_was_shrunk(workdir):
    """The predictor shrank a uint8 image in float, data.max_size (training, evaluation) in uint8: the
    network saw an input that differed by rounding, and evaluation could not score what predict returns."""
    from fcn.data.images import fit_image
    from fcn.inference import resize_channels

    image = random_image(40, 60)
    small, whole = load(workdir, max_size=16), load(workdir)
    expected = resize_channels(next(whole._logits([fit_image(image, 16)], False)), 40, 60)
    np.testing.assert_array_equal(next(small._logits([image], False)), expected)


def test_more_classes_than_a_uint8_class_map_holds_is_refused():
    """A model of 300 classes predicted class 299 as 43 (299 % 256): the class map is uint8."""
    with pytest.raises(ValueError, match="300 classes: class maps are uint8"):
        Segmenter(UNet(300, features=1, depth=0, rngs=nnx.Rngs(0)))


def test_group_norm_falls_back_to_exact_per_size_buckets():
    model = UNet(3, features=4, depth=2, norm="group", rngs=nnx.Rngs(0))
    seg = Segmenter(model, bucket=32)
    image = random_image(9, 11)
    assert not seg.exact_buckets and seg.bucket == 4
    np.testing.assert_allclose(seg.predict_proba(image), reference_proba(seg, image), atol=1e-5)


@pytest.mark.parametrize("pad_mode", ["constant", "edge"])
def test_padding_up_front_as_the_model_pads_gives_its_prediction(pad_mode):
    """The model pads images (not centred values): uint8 padding in its mode, as evaluation batches
    do, and the predictor's canvas give the unpadded image's probabilities, "constant" (black) included."""
    model = UNet(3, features=4, depth=2, pad_mode=pad_mode, rngs=nnx.Rngs(0))
    model.eval()
    seg = Segmenter(model, bucket=32)
    image = random_image(9, 11)
    np.testing.assert_allclose(seg.predict_proba(image), reference_proba(seg, image), atol=1e-5)
    padded = np.pad(image, ((0, 3), (0, 1), (0, 0)), mode=pad_mode)  # to 12 x 12, as eval_batches pads
    np.testing.assert_allclose(reference_proba(seg, padded)[:9, :11], reference_proba(seg, image), atol=1e-5)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        (np.zeros((4, 0), np.uint8), "empty image"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((4,), np.uint8), "shape"),
        (np.zeros((4, 4, 3), bool), "dtype"),
        (np.zeros((4, 4, 3), np.complex64), "dtype"),
        (np.full((4, 4, 3), 300, np.int32), "8-bit"),
        (np.full((4, 4, 3), 2.0, np.float32), "[0, 1]"),
        (np.full((4, 4, 3), np.nan, np.float32), "[0, 1]"),
        (None, "image: None (NoneType) is not an image; expected a file path"),
        ({"image": 1}, "(dict) is not an image"),
        ((x for x in ()), "(generator) is not an image"),
        (np.array([np.zeros((2, 2, 3)), np.zeros((3, 3, 3))], dtype=object), "(ndarray) is not an image"),
        ("no/such/file.png", "no/such/file.png"),
        (Image.fromarray(np.zeros((4, 4), np.uint16)), "image: I;16 image (more than 8 bits"),
    ],
)
def test_bad_inputs_raise_a_clear_value_error(seg, bad, words):
    with pytest.raises(ValueError, match=None) as info:
        seg.predict(bad)
    assert isinstance(info.value, DataError) and words in str(info.value)


@pytest.mark.parametrize("empty", [[], (), np.zeros((0, 8, 8, 3), np.uint8)])
def test_an_empty_batch_raises_whether_a_list_or_an_array(empty):
    """An empty list came back as [] while an empty array [0, H, W, C] raised: both raise now."""
    seg = Segmenter(UNet(3, features=4, depth=2, rngs=nnx.Rngs(0)))
    for method in (seg.predict, seg.predict_proba):
        with pytest.raises(DataError, match="empty batch of images: nothing to predict"):
            method(empty)
    assert seg.compilations == 0


@pytest.mark.parametrize("channels", [1, 4])
def test_a_model_of_other_than_three_input_channels_is_refused_when_built(channels):
    """Built on a UNet of in_channels=4, a Segmenter fed it RGB and failed at the first prediction."""
    with pytest.raises(ValueError, match=f"a model with in_channels={channels}: a Segmenter feeds it RGB"):
        Segmenter(UNet(3, in_channels=channels, features=4, depth=2, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("palette", [[[255, 0, 0], [0, 255, 0]], [[0.5, 0.2, 0.1]] * 3, [[0, 0, 300]] * 3, [1, 2]])
def test_a_palette_short_of_the_classes_or_out_of_range_is_refused_when_built(palette):
    """A palette of 2 colours for 3 classes drew the third class black and made viz.legend raise an
    IndexError; colours in [0, 1] (matplotlib's) or past 255 were cast to uint8 without a word."""
    model = UNet(3, features=4, depth=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"a palette of shape .* for a model with 3 classes: give one RGB colour"):
        Segmenter(model, palette=palette)
    flat = Segmenter(model, palette=[9, 8, 7] * 3)  # a flat list, as PIL's putpalette takes, still works
    assert flat.palette.shape == (3, 3) and flat.palette.dtype == np.uint8 and flat.palette[2, 0] == 9


@pytest.mark.parametrize(
    "palette",
    [np.full((3, 4), 7, np.uint8), np.zeros((4, 3, 3), np.uint8), [(0, 0, 0), (255, 0)]],
    ids=["rgba", "3d", "ragged"],
)
def test_a_palette_not_of_rgb_rows_is_refused_naming_it(palette):
    """An RGBA palette [3, 4] for 3 classes (12 values: a multiple of 3) was read as four RGB rows made of
    mixed channels, drawing class 1 in (A0, R1, G1), without a word; a ragged list raised numpy's
    "inhomogeneous shape" error, naming no palette."""
    model = UNet(3, features=4, depth=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^a palette of shape .* for a model with 3 classes: give one RGB colour"):
        Segmenter(model, palette=palette)


def test_bad_files_are_named(seg, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("empty.png", "notes.png"):
        with pytest.raises(DataError, match=name):
            seg.predict(tmp_path / name)
    with pytest.raises(DataError, match="directory"):
        seg.predict(tmp_path)


DTYPES = [np.uint8, np.uint16, np.int8, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    h=st.integers(0, 40),
    w=st.integers(0, 40),
    channels=st.sampled_from([None, 1, 2, 3, 4, 5]),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1.0, 255.0, 1000.0, -1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_array_works_or_fails_clearly(seg, h, w, channels, dtype, scale, seed):
    shape = (h, w) if channels is None else (h, w, channels)
    values = np.random.default_rng(seed).random(shape) * scale
    image = values.astype(dtype) if dtype is not np.bool_ else values > 0.5
    try:
        classes = seg.predict(image)
    except ValueError as e:
        assert isinstance(e, DataError) and str(e)
        return
    assert classes.shape == (h, w) and classes.dtype == np.uint8 and classes.max() < 4


def test_a_truncated_or_closed_pil_image_is_a_data_error_naming_it(tmp_path):
    """Image.open of a truncated file decodes lazily: predicting it raised OSError ("image file is
    truncated", no name), or for RGBA/palette files "cannot convert mode RGBA to RGB"; a closed one
    raised a bare AssertionError from PIL."""
    seg = Segmenter(UNet(3, features=4, depth=2, rngs=nnx.Rngs(0)))
    good = random_image(8, 8)
    for mode in ("RGB", "RGBA", "P"):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(random_image(40, 50, seed=1)).convert(mode).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(DataError, match=r"^image 1: corrupt or truncated image \(image file is truncated\)"):
            seg.predict([good, Image.open(path)])
    Image.fromarray(good).save(tmp_path / "whole.png")
    with Image.open(tmp_path / "whole.png") as image:
        pass
    with pytest.raises(DataError, match="image: its file was closed before it was decoded; pass the path"):
        seg.predict(image)
    assert seg.compilations == 0
