"""Decoded splits and training canvases kept on disk (fcn/data/cache.py), read back bit for bit."""

import os

import numpy as np
import pytest

from fcn.data import IGNORE_LABEL
from tests.test_data_sources import folder, make_folder, rgb, save, snapshot


def cached_entries():
    from fcn.data import cache

    return sorted(cache.decoded_dir().glob("*.split"))


def no_decoding(monkeypatch):
    """Any decoding from here on fails the test: what loads must come from the cache."""

    def fail(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr("fcn.data.images.read_pair", fail)


def test_decoded_split_is_cached_and_read_back_bit_for_bit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=5, ext="jpg")
    before = snapshot(root)
    first = folder(root, val_fraction=0.0).load("train")
    assert len(cached_entries()) == 1
    with monkeypatch.context() as m:
        no_decoding(m)
        caplog.set_level("INFO", logger="fcn.data.cache")
        again = folder(root, val_fraction=0.0).load("train")
    assert "5 decoded examples read from" in caplog.text
    assert list(again.names) == list(first.names)
    for a, b in zip([*again.images, *again.labels], [*first.images, *first.labels]):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert snapshot(root) == before  # the data folder itself is never written


def test_decoded_cache_misses_when_a_file_or_setting_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=3)
    assert int(folder(root, val_fraction=0.0).load("train").labels[1].max()) == 1
    mask = root / "masks" / "im01.png"
    save(mask, np.zeros((6, 8), np.uint8))  # same size on disk or not: a new modification time
    assert int(folder(root, val_fraction=0.0).load("train").labels[1].max()) == 0
    assert len(folder(root, val_fraction=0.0, max_size=4).load("train").images[0]) == 3  # another setting
    assert len(cached_entries()) == 3
    split = folder(root, val_fraction=0.0, skip_bad=True).load("train")  # skip_bad is in the key too
    assert len(split) == 3 and len(cached_entries()) == 4
    (root / "images" / "im02.png").write_bytes(b"")
    split = folder(root, val_fraction=0.0, skip_bad=True).load("train")
    assert list(split.names) == ["im00", "im01"]
    assert len(cached_entries()) == 4  # a split with skipped files is not kept: each run reports them


def test_unreadable_cache_entry_is_decoded_again_and_replaced(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=3)
    first = folder(root, val_fraction=0.0).load("train")
    (entry,) = cached_entries()
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a full disk
    split = folder(root, val_fraction=0.0).load("train")
    assert "unreadable" in caplog.text and "decoding again" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(split.images, first.images))
    with monkeypatch.context() as m:
        no_decoding(m)
        assert list(folder(root, val_fraction=0.0).load("train").names) == list(first.names)


def test_cache_decoded_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=3)
    folder(root, val_fraction=0.0, cache_decoded=False).load("train")
    assert not (tmp_path / "cache").exists()


def test_decoded_cache_keeps_the_most_recently_used_within_its_limit(tmp_path):
    from fcn.data import cache

    for i, name in enumerate(["old", "mid", "new"]):
        (tmp_path / f"{name}.split").write_bytes(b"x" * 100)
        os.utime(tmp_path / f"{name}.split", (1000 + i, 1000 + i))
    cache.trim(tmp_path, limit=250)
    assert sorted(p.stem for p in tmp_path.glob("*.split")) == ["mid", "new"]


def test_entry_over_the_cache_limit_is_not_written(tmp_path, monkeypatch, caplog):
    """A split larger than FCN_DECODED_CACHE_GB would be trimmed right after being written: every run
    would write it for nothing and say it was cached. It is not written, and the log says why."""
    from fcn.data import cache

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FCN_DECODED_CACHE_GB", str(500 / 2**30))  # 500 bytes; the split holds 3 x 6 x 8 x 4
    monkeypatch.setattr(cache, "write_atomic", lambda *a: pytest.fail("written although over the limit"))
    caplog.set_level("INFO", logger="fcn.data.cache")
    root = make_folder(tmp_path / "data", n=3)
    assert len(folder(root, val_fraction=0.0).load("train")) == 3
    assert "not cached: 0 MiB is over FCN_DECODED_CACHE_GB" in caplog.text and "cached in" not in caplog.text


@pytest.mark.parametrize(("value", "entries"), [("inf", 1), ("lots", 1), ("0", 0)])
def test_decoded_cache_limit_inf_is_no_limit_and_a_bad_value_the_default(tmp_path, monkeypatch, caplog, value, entries):
    """FCN_DECODED_CACHE_GB=inf (no limit) was an OverflowError from int(inf), a traceback that ended the run."""
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FCN_DECODED_CACHE_GB", value)
    root = make_folder(tmp_path / "data", n=3)
    assert len(folder(root, val_fraction=0.0).load("train")) == 3
    assert len(cached_entries()) == entries
    assert ("is not a number of GiB; using 4" in caplog.text) == (value == "lots")


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 2), (9, 4)], []])
def test_decoded_cache_round_trips_mixed_sizes_and_empty_splits(tmp_path, monkeypatch, shapes):
    from fcn.data import cache
    from fcn.data.base import Split

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    split = Split(
        images=[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes],
        labels=[rng.integers(0, 5, (h, w), dtype=np.uint8) for h, w in shapes],
        names=[f"n{i}" for i in range(len(shapes))],
    )
    cache.save("key", split, "test")
    back = cache.load("key", "test")
    assert list(back.names) == list(split.names)
    for a, b in zip([*back.images, *back.labels], [*split.images, *split.labels]):
        assert a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_training_canvas_is_cached_and_read_back_bit_for_bit(tmp_path, monkeypatch, scale):
    from fcn.data import pipeline

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=4)
    save(root / "images" / "im03.png", rgb(3)[:4, :6])  # one smaller pair: padded in the canvas
    save(root / "masks" / "im03.png", np.ones((4, 6), np.uint8))
    first = pipeline.stack(folder(root, val_fraction=0.0).load("train"), IGNORE_LABEL, scale)
    assert len(cached_entries()) == 2  # the split and its canvas
    with monkeypatch.context() as m:
        no_decoding(m)
        m.setattr(pipeline, "rescale_pair", lambda *a: pytest.fail("resized although cached"))
        again = pipeline.stack(folder(root, val_fraction=0.0).load("train"), IGNORE_LABEL, scale)
    for a, b in [
        (again.images_NHWC, first.images_NHWC),
        (again.labels_NHW, first.labels_NHW),
        (again.sizes_N2, first.sizes_N2),
    ]:
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    h, w = again.sizes_N2[3]
    assert h < again.labels_NHW.shape[1] and again.labels_NHW[3, h:].min() == IGNORE_LABEL  # padding too
    assert not again.images_NHWC.flags.writeable  # memory-mapped, read-only: nothing can change the entry
    if scale != 1:  # class statistics still see the labels at their own size
        assert [lab.shape for lab in again.labels()] == [lab.shape for lab in first.labels()]
    other = pipeline.stack(folder(root, val_fraction=0.0).load("train"), IGNORE_LABEL, 0.75)
    assert other.images_NHWC.shape[1:3] != first.images_NHWC.shape[1:3]  # another scale: another entry
    assert len(cached_entries()) == 3


def test_unreadable_canvas_entry_is_made_again(tmp_path, monkeypatch, caplog):
    from fcn.data import pipeline

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=3)
    split = folder(root, val_fraction=0.0).load("train")
    split_entries = set(cached_entries())
    first = pipeline.stack(split, IGNORE_LABEL, 0.5)
    (canvas_entry,) = set(cached_entries()) - split_entries
    canvas_entry.write_bytes(canvas_entry.read_bytes()[:-10])  # truncated
    again = pipeline.stack(folder(root, val_fraction=0.0).load("train"), IGNORE_LABEL, 0.5)
    assert "unreadable" in caplog.text
    assert np.array_equal(again.images_NHWC, first.images_NHWC)
    assert len(cached_entries()) == 2


def flip_bytes(path, at, n=64):
    """Inverts n bytes of `path` from `at`, its length kept: a flipped bit, a block read back wrong."""
    data = bytearray(path.read_bytes())
    data[at : at + n] = bytes(b ^ 0xFF for b in data[at : at + n])
    path.write_bytes(bytes(data))


def test_split_and_canvas_entries_changed_inside_are_made_again_with_one_warning_each(tmp_path, monkeypatch, caplog):
    """Bytes changed inside an entry, its length kept: the split's pixels and the canvas were read back as
    they were, without a word, and trained on. Each gets one warning naming it, and is made afresh."""
    from fcn.data import pipeline

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", n=4)
    split = folder(root, val_fraction=0.0).load("train")
    (split_entry,) = cached_entries()
    first = pipeline.stack(split, IGNORE_LABEL)
    (canvas_entry,) = set(cached_entries()) - {split_entry}
    for entry in (split_entry, canvas_entry):
        flip_bytes(entry, 150)  # inside the first array (the images; its .npy header is 128 bytes)
    caplog.set_level("WARNING")
    split = folder(root, val_fraction=0.0).load("train")
    again = pipeline.stack(split, IGNORE_LABEL)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    for entry, message in zip((split_entry, canvas_entry), warnings):
        assert f"{entry} is unreadable (its checksum does not match its contents)" in message
    assert all(np.array_equal(a, b) for a, b in zip(split.images, first.images_NHWC))
    assert np.array_equal(again.images_NHWC, first.images_NHWC) and np.array_equal(again.labels_NHW, first.labels_NHW)
    with monkeypatch.context() as m:  # both written anew, and read back
        no_decoding(m)
        m.setattr(pipeline, "rescale_pair", lambda *a: pytest.fail("made although cached"))
        assert np.array_equal(
            pipeline.stack(folder(root, val_fraction=0.0).load("train"), IGNORE_LABEL).images_NHWC[0], rgb(0)
        )


def test_an_entry_without_its_checksum_is_not_used(tmp_path, monkeypatch, caplog):
    """What an older fcn kept (its arrays, no checksum) is made afresh: the cache is only a cache."""
    from fcn.data import cache

    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path))
    cache.decoded_dir().mkdir(parents=True)
    with open(cache.decoded_dir() / "key.split", "wb") as f:
        for a in (np.zeros(6, np.uint8), np.zeros(2, np.uint8), np.array([[1, 2]]), np.array(["n"])):
            np.save(f, a, allow_pickle=False)
    assert cache.load("key", "test") is None
    assert "key.split is unreadable (it carries no checksum)" in caplog.text
    assert not cached_entries()
