"""Streaming the training set from its files: the same batches, parameters and errors as in memory."""

import logging

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from fcn import checkpoint, state as state_lib
from fcn.config import ConfigError, validate
from fcn.data import DataError, get_source, pipeline
from fcn.data.stream import Stream
from fcn.train import train_and_evaluate

SIZES = [(20, 28), (24, 32), (18, 30), (24, 26), (22, 32), (16, 20), (24, 24)]  # (H, W), varied


def make_folder(root, sizes=SIZES):
    """images/ (PNG, one JPEG) and masks/ of varied sizes; mask values 0, 1, and 255 (ignored)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (h, w) in enumerate(sizes):
        rng = np.random.default_rng(i)
        ext = "jpg" if i == 2 else "png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.{ext}")
        mask = rng.integers(0, 2, (h, w), dtype=np.uint8)
        mask[0, :3] = 255
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    return root


def folder_config(root, storage, **data):
    config = tiny.get_config()
    d = config.data
    d.source, d.path, d.class_names, d.val_fraction, d.decode_workers = "folder", str(root), ("a", "b"), 0.0, 2
    d.storage, d.prefetch = storage, 2
    for key, value in data.items():
        d[key] = value
    return config


@pytest.mark.parametrize("input_scale", [1.0, 0.5])
def test_stream_gives_the_in_memory_batches_and_labels(tmp_path, input_scale):
    root = make_folder(tmp_path / "d")
    configs = [folder_config(root, s) for s in ("memory", "stream")]
    for c in configs:
        c.model.input_scale = input_scale
    memory, stream = (pipeline.training_data(get_source(c.data), c) for c in configs)
    with stream:
        assert isinstance(stream, Stream) and not isinstance(memory, Stream)
        assert memory.sizes_N2.tolist() == stream.sizes_N2.tolist()
        assert len(set(map(tuple, memory.sizes_N2.tolist()))) > 1  # padding is exercised
        # In order, a jump back (a resume), and a change of rows (another process's share).
        for step, rows in [(0, slice(None)), (1, slice(None)), (2, slice(None)), (6, slice(None)), (1, slice(None))]:
            a, b = memory.batch(step, 3, 7, rows), stream.batch(step, 3, 7, rows)
            for x, y in zip(a, b):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(memory.batch(4, 4, 1, slice(2, 4))[0], stream.batch(4, 4, 1, slice(2, 4))[0])
        labels_m, labels_s = list(memory.labels()), list(stream.labels())
        assert len(labels_m) == len(labels_s) == len(SIZES)
        for x, y, (h, w) in zip(labels_m, labels_s, SIZES):
            assert x.shape == y.shape == (h, w)  # before input_scale: what class weights are computed from
            np.testing.assert_array_equal(x, y)


def test_auto_streams_when_the_bound_is_tiny(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    canvas = len(SIZES) * 24 * 32 * 4  # N x largest H x largest W x (3 + 1) bytes
    need = canvas + sum(h * w * 4 for h, w in SIZES)  # loading holds the decoded examples too
    caplog.set_level(logging.INFO)
    roomy = folder_config(root, "auto", max_memory_gb=need / 2**30)
    data = pipeline.training_data(get_source(roomy.data), roomy)
    assert isinstance(data, pipeline.Canvas) and data.images_NHWC.nbytes + data.labels_NHW.nbytes == canvas
    tight = folder_config(root, "auto", max_memory_gb=(need - 1) / 2**30)
    with pipeline.training_data(get_source(tight.data), tight) as data:
        assert isinstance(data, Stream)
    assert "held in memory" in caplog.text and ": streamed (2 threads, 2 batches ahead)" in caplog.text


def test_streamed_training_equals_in_memory_training(tmp_path):
    config = tiny.get_config()  # unchanged otherwise: the compilation is shared with tests/test_train.py
    config.data.prefetch = 2
    reports = {}
    for storage in ("memory", "stream"):
        config.data.storage = storage
        reports[storage] = train_and_evaluate(config, tmp_path / storage)
    assert reports["memory"]["mean_iou"] == reports["stream"]["mean_iou"]
    _, abstract, _ = state_lib.abstract_state(config, 4)
    params = {}
    for storage in ("memory", "stream"):
        ckpts = checkpoint.Checkpoints(tmp_path / storage)
        params[storage] = ckpts.restore(abstract)
        ckpts.close()
    assert int(params["stream"]["step"]) == config.num_steps
    for x, y in zip(jax.tree.leaves(params["memory"]), jax.tree.leaves(params["stream"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_batches(data, steps=6):
    for step in range(steps):
        data.batch(step, 4, 0)


def test_stream_names_a_corrupt_file_and_bad_label_values(tmp_path):
    root = make_folder(tmp_path / "d")
    good = (root / "images" / "im3.png").read_bytes()
    (root / "images" / "im3.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    config = folder_config(root, "stream")
    with pipeline.training_data(get_source(config.data), config) as data:
        with pytest.raises(DataError, match=r"im3\.png: corrupt or truncated image"):
            _all_batches(data)
    (root / "images" / "im3.png").write_bytes(good)
    Image.fromarray(np.full(SIZES[5], 7, np.uint8)).save(root / "masks" / "im5.png")
    with pipeline.training_data(get_source(config.data), config) as data:
        with pytest.raises(DataError, match=r"im5\.png: label values 7 are neither class ids \(0\.\.1\)"):
            _all_batches(data)
    (root / "images" / "im1.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"im1\.png: empty file"):  # headers are read at the start
        pipeline.training_data(get_source(config.data), config)


def test_stream_skip_bad(tmp_path, caplog):
    root = make_folder(tmp_path / "d")
    (root / "images" / "im1.png").write_bytes(b"")  # unreadable header: left out at the start
    good = (root / "images" / "im3.png").read_bytes()
    (root / "images" / "im3.png").write_bytes(good[: len(good) // 2])  # fails only when decoded
    config = folder_config(root, "stream", skip_bad=True)
    with pipeline.training_data(get_source(config.data), config) as data:
        assert len(data) == len(SIZES) - 1
        names = {data.examples.names[i] for i in data.ids}
        assert "im1" not in names and "im3" in names
        seen = []
        for step in range(4):  # two epochs of 6: im3 comes up in each
            images, labels, sizes = data.batch(step, 3, 0)
            seen += [tuple(s) for s in sizes.tolist()]
    assert "im1.png: empty file" in caplog.text and "im3.png: corrupt or truncated" in caplog.text
    assert caplog.text.count("im3.png") == 1  # logged once, not at every epoch
    assert len(seen) == 12 and SIZES[3] not in seen
    assert seen.count(SIZES[4]) == 4  # im4 once an epoch, and in im3's place once an epoch


def test_skip_bad_held_in_memory_warns_of_a_bad_file_once(tmp_path, caplog):
    """data.storage="auto" scans the headers, then decodes the split when it fits: a file the scan
    skipped was read and warned of again ("skipped 1 of 7", then again in decoding)."""
    root = make_folder(tmp_path / "d")
    (root / "images" / "im1.png").write_bytes(b"")  # unreadable header: left out by the scan
    good = (root / "images" / "im3.png").read_bytes()
    (root / "images" / "im3.png").write_bytes(good[: len(good) // 2])  # fails only when decoded
    config = folder_config(root, "auto", skip_bad=True)
    with caplog.at_level(logging.WARNING):
        data = pipeline.training_data(get_source(config.data), config)
    assert not isinstance(data, Stream) and len(data) == len(SIZES) - 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad pair")]
    assert len(skipped) == 2 and "im1.png" in skipped[0] and "im3.png" in skipped[1], skipped
    assert "(sizes): skipped 1 of 7 pairs" in caplog.text and "skipped 1 of 6 pairs" in caplog.text


def test_storage_fields_are_validated():
    config = tiny.get_config()
    config.data.storage = "disk"
    with pytest.raises(ConfigError, match=r"config.data.storage='disk'.*auto, memory, stream"):
        validate(config)
    config = tiny.get_config()
    config.data.max_memory_gb = 0
    with pytest.raises(ConfigError, match=r"config.data.max_memory_gb=0\.0 must be a positive number"):
        validate(config)
    config = tiny.get_config()
    config.data.prefetch = -1
    with pytest.raises(ConfigError, match=r"config.data.prefetch=-1 must be an integer of at least 0"):
        validate(config)


def test_a_bad_file_found_before_the_first_step_leaves_no_decoding_threads(tmp_path):
    """The class weights read every label through the stream before training; a bad file there raised
    out of train_and_evaluate with the stream's threads left running (closed only once training began)."""
    import threading

    root = make_folder(tmp_path / "d")
    good = (root / "images" / "im3.png").read_bytes()
    (root / "images" / "im3.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    config = folder_config(root, "stream")
    config.loss.class_weights = "median_freq"
    with pytest.raises(DataError, match=r"im3\.png: corrupt or truncated image"):
        train_and_evaluate(config, tmp_path / "run")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fcn-stream")]


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_pair_resized_after_the_start_is_named_as_changed_or_skipped(tmp_path, caplog, skip_bad):
    """A pair rewritten at another size while streaming was "im4: decoded as 10x12 (HxW) but its header
    says 22x32" (its header said 10x12 by then), and ended the run even with data.skip_bad."""
    root = make_folder(tmp_path / "d")
    config = folder_config(root, "stream", skip_bad=skip_bad)
    with pipeline.training_data(get_source(config.data), config) as data:
        Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "images" / "im4.png")
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "im4.png")
        if not skip_bad:
            with pytest.raises(DataError, match=r"im4: decoded at 10x12 \(HxW\), but it was 22x32 when .* began"):
                _all_batches(data)
            return
        sizes = [tuple(s) for step in range(4) for s in data.batch(step, 4, 0)[2].tolist()]
    assert (10, 12) not in sizes and SIZES[4] not in sizes and len(sizes) == 16
    assert "skipping bad pair" in caplog.text and "im4: decoded at 10x12" in caplog.text
