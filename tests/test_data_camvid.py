"""The CamVid source (fcn/data/camvid.py): its layout, where it is looked for, and the dev copy."""

import json
from pathlib import Path

import numpy as np
import pytest

from fcn.data import IGNORE_LABEL, DataError, get_source
from tests.test_data_sources import config, folder, make_folder, rgb, save

REPO = Path(__file__).resolve().parents[1]
REAL_CAMVID = REPO.parent / "shared" / "datasets" / "camvid"


def make_camvid(root, counts=(("train", 3), ("val", 2))):
    """Fake CamVid: frames alternate .png / .jpg; label value 11 (void) at [0, 0]."""
    for split, n in counts:
        for i in range(n):
            ext = "png" if i % 2 == 0 else "jpg"
            save(root / split / f"{split}{i}.{ext}", rgb(i))
            label = np.full((6, 8), i % 11, np.uint8)
            label[0, 0] = 11
            save(root / f"{split}annot" / f"{split}{i}.png", label)
    return root


@pytest.fixture
def no_download(tmp_path, monkeypatch):
    """Empty cache and an unreachable URL: any download attempt fails."""
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FCN_CAMVID_DIR", raising=False)
    return tmp_path / "cache"


def test_camvid_png_and_jpg_frames_void_and_splits(tmp_path, no_download):
    source = get_source(config("camvid", path=str(make_camvid(tmp_path / "cv"))))
    assert source.splits == ("train", "val") and source.num_classes == 11
    assert source.palette.shape == (11, 3)
    train = source.load("train")
    assert list(train.names) == ["train0", "train1", "train2"]
    np.testing.assert_array_equal(train.images[0], rgb(0))  # png: exact
    assert train.images[1].shape == (6, 8, 3)  # jpg: lossy
    assert train.labels[2][0, 0] == IGNORE_LABEL and (train.labels[2][1:] == 2).all()
    with pytest.raises(ValueError, match="'test' is not available; available splits: train, val"):
        source.load("test")


def test_camvid_missing_frame_or_annotation_is_named(tmp_path, no_download):
    root = make_camvid(tmp_path / "cv")
    (root / "val" / "val1.jpg").unlink()
    (root / "trainannot" / "train2.png").unlink()
    source = get_source(config("camvid", path=str(root)))
    with pytest.raises(DataError, match=r"valannot: 1 annotation\(s\) with no frame .*: val1$"):
        source.load("val")
    with pytest.raises(DataError, match=r"train: 1 frame\(s\) with no annotation .*: train2$"):
        source.load("train")


def test_pairing_by_stem_skips_hidden_files_and_refuses_two_files_of_one_stem(tmp_path, no_download):
    """Both sources pair through fcn.data.folder.pair_by_stem: the same rules and messages."""
    root = make_folder(tmp_path / "f", n=3)
    (root / "images" / ".DS_Store").write_bytes(b"junk")
    (root / "masks" / "notes").mkdir()
    assert list(folder(root, val_fraction=0.0).load("train").names) == ["im00", "im01", "im02"]
    save(root / "images" / "im01.jpg", rgb(1))
    with pytest.raises(DataError, match=r"images: two image files for stem 'im01': im01.jpg, im01.png"):
        folder(root)
    cv = make_camvid(tmp_path / "cv")
    save(cv / "trainannot" / "train2.PNG", np.zeros((6, 8), np.uint8))  # suffixes match in any case
    with pytest.raises(DataError, match=r"trainannot: two annotation files for stem 'train2'"):
        get_source(config("camvid", path=str(cv))).load("train")


def test_camvid_explicit_path_must_exist_and_is_not_downloaded_over(tmp_path, no_download):
    with pytest.raises(DataError, match=r"data.path=.*nope does not exist"):
        get_source(config("camvid", path=str(tmp_path / "nope")))
    assert not no_download.exists()


def test_camvid_env_var_is_used(tmp_path, no_download, monkeypatch):
    monkeypatch.setenv("FCN_CAMVID_DIR", str(make_camvid(tmp_path / "cv", (("val", 1),))))
    assert get_source(config("camvid")).splits == ("val",)


def test_camvid_found_through_the_environment_is_recorded_for_evaluation(tmp_path, no_download, monkeypatch):
    # `make train` points FCN_CAMVID_DIR at the data; `python -m fcn.evaluate` later, in a shell without
    # the variable, reads the path that train.py recorded in the workdir's config.json.
    from configs import tiny
    from fcn import evaluate
    from fcn.train import train_and_evaluate

    root = make_camvid(tmp_path / "cv", (("train", 4), ("val", 2)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FCN_CAMVID_DIR", "cv")  # relative: recorded absolute
    assert get_source(config("camvid")).found_at == str(root.resolve())
    assert get_source(config("camvid", path=str(root))).found_at == ""  # named in the config: kept as given
    c = tiny.get_config()
    c.data.source, c.augment.crop_size, c.num_steps = "camvid", (6, 8), 1  # as the next test: one program for both
    train_and_evaluate(c, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"] == str(root.resolve())
    monkeypatch.delenv("FCN_CAMVID_DIR")
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--examples", "0"]) == 0


def test_a_relative_data_path_is_recorded_absolute_for_evaluation_from_another_folder(
    tmp_path, no_download, monkeypatch
):
    # README's train command names the data relatively (--config.data.path=../shared/datasets/camvid);
    # config.json held it as given, so python -m fcn.evaluate from another folder looked in the wrong place.
    from configs import tiny
    from fcn import evaluate
    from fcn.train import train_and_evaluate

    root = make_camvid(tmp_path / "cv", (("train", 4), ("val", 2)))
    monkeypatch.chdir(tmp_path)
    c = tiny.get_config()
    c.data.source, c.data.path, c.augment.crop_size, c.num_steps = "camvid", "cv", (6, 8), 1
    train_and_evaluate(c, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["path"] == str(root.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--examples", "0"]) == 0


@pytest.mark.skipif(not REAL_CAMVID.is_dir(), reason=f"no dev copy at {REAL_CAMVID}")
def test_real_camvid_dev_copy(monkeypatch):
    monkeypatch.delenv("FCN_CAMVID_DIR", raising=False)
    source = get_source(config("camvid", path=str(REAL_CAMVID)))
    assert source.splits == ("train", "val")
    for split, n in (("train", 367), ("val", 101)):
        data = source.load(split)
        assert len(data) == n
        assert {im.shape for im in data.images} == {(360, 480, 3)}
        assert {lab.shape for lab in data.labels} == {(360, 480)}
        assert max(int(lab.max()) for lab in data.labels) == IGNORE_LABEL
