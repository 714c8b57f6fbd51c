"""Data sources: the user's folders, synthetic shapes (CamVid: test_data_camvid.py; TFDS: test_data_tfds.py)."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from configs.default import get_config
from fcn.data import DataError, get_source

REPO = Path(__file__).resolve().parents[1]


def config(source, **overrides):
    c = get_config().data
    c.source, c.decode_workers = source, 2
    for key, value in overrides.items():
        c[key] = value
    return c


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path, **kwargs)
    return path


def rgb(seed, h=6, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_unknown_source_names_value_and_valid_ones():
    with pytest.raises(DataError, match=r"'pascal'.*camvid, folder, tfds, synthetic"):
        get_source(config("pascal"))


# --- folder ---------------------------------------------------------------


def make_folder(root, n=10, ext="png"):
    for i in range(n):
        save(root / "images" / f"im{i:02d}.{ext}", rgb(i))
        save(root / "masks" / f"im{i:02d}.png", np.full((6, 8), i % 2, np.uint8))
    return root


def folder(path, **overrides):
    return get_source(config("folder", path=str(path), class_names=("bg", "fg"), **overrides))


def snapshot(root):
    """Every path under root with its bytes and mtime: loading must change none."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_folder_pairs_holds_out_val_and_writes_nothing(tmp_path):
    root = make_folder(tmp_path / "data", n=10)
    before = snapshot(root)
    source = folder(root, val_fraction=0.2)
    train, val = source.load("train"), source.load("val")
    assert len(train) == 8 and len(val) == 2
    assert sorted([*train.names, *val.names]) == [f"im{i:02d}" for i in range(10)]
    assert folder(root, val_fraction=0.2).load("val").names == val.names  # stable
    np.testing.assert_array_equal(train.images[0], rgb(int(train.names[0][2:])))
    assert snapshot(root) == before


def test_folder_split_layout(tmp_path):
    make_folder(tmp_path / "train", n=3, ext="jpg")
    make_folder(tmp_path / "val", n=2)
    source = folder(tmp_path)
    assert source.splits == ("train", "val") and len(source.load("val")) == 2


def test_folder_with_both_layouts_is_an_error_naming_both(tmp_path):
    """images/ masks/ beside val/: reading either layout alone would silently drop the other's files."""
    make_folder(tmp_path, n=3)
    make_folder(tmp_path / "val", n=2)
    with pytest.raises(DataError, match=r"holds both images/ and masks/ .* split folders val/: use one layout"):
        folder(tmp_path)


def test_folder_binary_0_255_masks(tmp_path):
    root = make_folder(tmp_path, n=2)
    save(root / "masks" / "im01.png", np.array([[0, 255] * 4] * 6, np.uint8))
    with pytest.raises(DataError, match=r"im01\.png: mask values are only 0 and 255"):
        folder(root, val_fraction=0.0).load("train")
    split = folder(root, val_fraction=0.0, value_map={"255": 1}).load("train")
    assert set(np.unique(split.labels[1])) == {0, 1}


def test_folder_binary_0_255_masks_with_another_ignore_label(tmp_path):
    """With data.ignore_label=100 the error said 255 would be read as the ignore label, and offered a
    value_map, {"255": 255}, that the config check then refused."""
    root = make_folder(tmp_path, n=2)
    save(root / "masks" / "im01.png", np.array([[0, 255] * 4] * 6, np.uint8))
    with pytest.raises(DataError, match="only 0 and 255") as e:
        folder(root, val_fraction=0.0, ignore_label=100).load("train")
    assert "read as the ignore label" not in str(e.value) and """value_map to {"255": 100}""" in str(e.value)
    split = folder(root, val_fraction=0.0, ignore_label=100, value_map={"255": 100}).load("train")
    assert set(np.unique(split.labels[1])) == {0, 100}


def test_folder_colour_masks(tmp_path):
    root = make_folder(tmp_path, n=2)
    mask = np.zeros((6, 8, 3), np.uint8)
    mask[:, 4:] = (255, 0, 0)
    save(root / "masks" / "im00.png", mask)
    with pytest.raises(DataError, match=r"im00\.png: RGB mask .* colour-coded"):
        folder(root, val_fraction=0.0).load("train")
    source = folder(root, val_fraction=0.0, color_map=((0, 0, 0), (255, 0, 0)))
    assert (source.load("train").labels[0][:, 4:] == 1).all()
    np.testing.assert_array_equal(source.palette[1], (255, 0, 0))


def test_folder_colour_masks_with_a_void_colour(tmp_path):
    root = make_folder(tmp_path, n=2)
    mask = np.zeros((6, 8, 3), np.uint8)
    mask[:, 4:], mask[0, 0] = (255, 0, 0), (224, 224, 192)  # the last: void, to ignore
    save(root / "masks" / "im00.png", mask)
    colors = ((0, 0, 0), (255, 0, 0), (224, 224, 192))
    with pytest.raises(DataError, match=r"""value_map does not map 2.*value_map='\{"2": 255\}'"""):
        folder(root, val_fraction=0.0, color_map=colors)
    source = folder(root, val_fraction=0.0, color_map=colors, value_map={"2": 255})
    label = source.load("train").labels[0]
    assert label[0, 0] == 255 and (label[:, 4:] == 1).all() and (label[1:, :4] == 0).all()
    assert source.palette.tolist() == [[0, 0, 0], [255, 0, 0]]  # one colour per class


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda r: save(r / "masks" / "im01.png", np.zeros((5, 8), np.uint8)), r"im01\.png is 6x8 .*im01\.png is 5x8"),
        (lambda r: save(r / "masks" / "im01.png", np.full((6, 8), 7, np.uint8)), r"im01\.png: label values 7 "),
        (lambda r: (r / "images" / "im01.png").write_bytes(b""), r"im01\.png: empty file"),
        (lambda r: (r / "images" / "im01.png").write_bytes(b"text"), r"im01\.png: not an image"),
        (
            lambda r: (r / "images" / "im01.png").write_bytes(save(r / "x.png", rgb(1, 60, 60)).read_bytes()[:300]),
            r"im01\.png: corrupt or truncated",
        ),
    ],
)  # fmt: skip
def test_folder_bad_files_are_named(tmp_path, damage, match):
    root = make_folder(tmp_path / "d", n=3)
    damage(root)
    with pytest.raises(DataError, match=match):
        folder(root, val_fraction=0.0).load("train")


def test_folder_skip_bad_counts(tmp_path, caplog):
    root = make_folder(tmp_path, n=4)
    (root / "images" / "im02.png").write_bytes(b"")
    split = folder(root, val_fraction=0.0, skip_bad=True).load("train")
    assert list(split.names) == ["im00", "im01", "im03"]
    assert "skipped 1 of 4 pairs" in caplog.text


def test_folder_link_to_nothing_is_named_as_unreadable_not_dropped(tmp_path):
    """A dangling link (an image on an unmounted drive) was dropped from the listing, so its mask
    was reported as having no image; now reading names it, and skip_bad skips it."""
    root = make_folder(tmp_path, n=3)
    (root / "images" / "im01.png").unlink()
    (root / "images" / "im01.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"im01\.png: cannot read file"):
        folder(root, val_fraction=0.0).load("train")
    split = folder(root, val_fraction=0.0, skip_bad=True).load("train")
    assert list(split.names) == ["im00", "im02"]


def test_folder_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"expected images/ and masks/.*found: \(empty\)"):
        folder(tmp_path / "empty")
    root = make_folder(tmp_path / "a", n=3)
    (root / "masks" / "im01.png").unlink()
    with pytest.raises(DataError, match=r"images: 1 image\(s\) with no mask .*: im01"):
        folder(root)
    (root / "images" / "im01.png").unlink()
    (root / "images" / "im02.png").unlink()
    with pytest.raises(DataError, match=r"masks: 1 mask\(s\) with no image .*: im02"):
        folder(root)
    for stem in ("im00", "im02"):
        (root / "masks" / f"{stem}.png").unlink()
    (root / "images" / "im00.png").unlink()
    with pytest.raises(DataError, match=r"images: no image files \(.png"):
        folder(root)
    with pytest.raises(DataError, match="data.class_names"):
        get_source(config("folder", path=str(root)))


def test_folder_of_subfolders_only_says_they_are_not_searched(tmp_path):
    """Images sorted into class or date subfolders: the error said only 'no image files'."""
    save(tmp_path / "images" / "2024" / "a.png", rgb(0))
    save(tmp_path / "masks" / "a.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError, match=r"images: no image files \(.*\); subfolders there, not searched: 2024/$"):
        folder(tmp_path)


def test_stems_pair_in_either_unicode_form(tmp_path):
    """A name written decomposed (NFD, as macOS has stored them) pairs with the same name composed
    (NFC): before, the pair was refused with two names that look identical."""
    import unicodedata

    name = "caf\u00e9 \u00e0 l'ombre"
    decomposed = unicodedata.normalize("NFD", name)
    assert decomposed != name
    save(tmp_path / "images" / f"{decomposed}.png", rgb(0))
    save(tmp_path / "images" / "b.png", rgb(1))
    save(tmp_path / "masks" / f"{name}.png", np.full((6, 8), 1, np.uint8))
    save(tmp_path / "masks" / "b.png", np.zeros((6, 8), np.uint8))
    from fcn.data.folder import pair_files

    pairs = pair_files(tmp_path)
    assert [(i.name, m.name) for i, m in pairs] == [("b.png", "b.png"), (f"{decomposed}.png", f"{name}.png")]


def test_unpaired_stem_names_its_file_of_a_format_not_read(tmp_path):
    root = make_folder(tmp_path, n=3)
    (root / "masks" / "im01.png").unlink()
    save(root / "masks" / "im01.jpg", np.zeros((6, 8), np.uint8))  # JPEG: lossy, not read as a mask
    with pytest.raises(
        DataError, match=r"no mask of the same stem .*: im01 \(im01\.jpg: not read as mask files, which end in \.png"
    ):
        folder(root)


def test_size_mismatch_of_an_exif_rotated_image_says_no_rotation_is_applied(tmp_path):
    root = make_folder(tmp_path, n=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees: 8x6 on screen, 6x8 stored
    save(root / "images" / "im01.png", rgb(1), exif=exif)
    save(root / "masks" / "im01.png", np.zeros((8, 6), np.uint8))  # drawn on the rotated view
    with pytest.raises(DataError, match=r"im01\.png is 6x8 .* is 8x6.*EXIF orientation 6.*not applied"):
        folder(root, val_fraction=0.0).load("train")


# Multi-channel arrays only as uint8: PIL cannot build other multi-channel images.
_PIXELS = st.one_of(
    st.tuples(st.just("uint8"), st.sampled_from([1, 2, 3, 4])),
    st.tuples(st.sampled_from(["uint16", "int32", "float32", "bool"]), st.just(1)),
)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # from truncated TIFFs
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    pixels=_PIXELS,
    fmt=st.sampled_from(["png", "jpg", "bmp", "tiff"]),
    mask_grows=st.booleans(),
    values=st.lists(st.sampled_from([0, 1, 2, 255, 7]), min_size=1, max_size=3),
    cut=st.sampled_from([None, 0, 20]),
)
def test_folder_loads_or_raises_data_error(size, pixels, fmt, mask_grows, values, cut):
    """Any image file either loads as uint8 [H, W, 3] or raises DataError."""
    dtype, channels = pixels
    rng = np.random.default_rng(0)
    shape = size if channels == 1 else (*size, channels)
    array = (rng.random(shape) * 300).astype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        try:
            Image.fromarray(array).save(root / "images" / f"a.{fmt}")
        except (TypeError, ValueError, OSError, KeyError):
            assume(False)  # PIL cannot write this combination: nothing to test
        if cut is not None:
            path = root / "images" / f"a.{fmt}"
            path.write_bytes(path.read_bytes()[:cut])
        mask_size = (size[0] + mask_grows, size[1])
        mask = rng.choice(np.array(values, np.uint8), mask_size)
        save(root / "masks" / "a.png", mask)
        source = get_source(config("folder", path=tmp, class_names=("a", "b", "c"), val_fraction=0.0))
        clean = dtype == "uint8" and channels in (1, 3) and fmt == "png" and cut is None
        try:
            split = source.load("train")
        except DataError:
            assert not (clean and not mask_grows and 7 not in values)
            return
        assert split.images[0].shape == (*size, 3) and split.images[0].dtype == np.uint8
        assert split.labels[0].shape == size
        assert set(np.unique(split.labels[0])) <= {0, 1, 2, 255}


# --- synthetic ---------------------------------------------------


def test_importing_fcn_data_and_synthetic_loading_do_not_import_tensorflow():
    code = (
        "import sys; from configs.default import get_config; import fcn.data; "
        "fcn.data.get_source(get_config().data).load('val'); "
        "assert not [m for m in sys.modules if m.startswith('tensorflow')], 'tensorflow'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)


def test_synthetic_is_deterministic_and_learnable_looking():
    c = config("synthetic", synthetic_size=(24, 32), synthetic_counts={"train": 6, "val": 3})
    source = get_source(c)
    assert source.splits == ("train", "val")
    assert source.class_names == ("background", "circle", "square", "triangle")
    a, b, val = source.load("train"), get_source(c).load("train"), source.load("val")
    for x, y in zip(a.images + a.labels, b.images + b.labels):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.images[0], val.images[0])
    assert a.images[0].shape == (24, 32, 3) and a.images[0].dtype == np.uint8
    assert a.labels[0].shape == (24, 32) and a.labels[0].dtype == np.uint8
    assert set(np.unique(np.concatenate([lab.ravel() for lab in a.labels]))) == {
        0,
        1,
        2,
        3,
    }
