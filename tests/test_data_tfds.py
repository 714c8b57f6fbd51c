"""The TFDS source, through tfds.testing.mock_data and tiny datasets prepared in a temporary folder
(no download)."""

import io
import logging
import sys

import numpy as np
import pytest

from fcn.data import DataError, get_source
from tests.test_data_sources import config, rgb


def test_tfds_image_header_over_pillows_limit_is_a_data_error_naming_the_example(monkeypatch, caplog):
    from PIL import Image

    from fcn.data import images
    from fcn.data.tfds import _encoded_size

    png = io.BytesIO()
    Image.new("RGB", (40, 30)).save(png, format="PNG")
    assert _encoded_size(png.getvalue(), "train[3]") == (30, 40)
    monkeypatch.setattr(images, "_warned_large", set(), raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 pixels: Pillow warns, naming nothing; fcn logs
    with caplog.at_level(logging.WARNING), pytest.warns(Image.DecompressionBombWarning):
        assert _encoded_size(png.getvalue(), "train[3]") == (30, 40)
    assert "train[3]: image of 30x40 (HxW), 1200 pixels" in caplog.text
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels: over twice the limit
    with pytest.raises(DataError, match=r"train\[3\]: image too large to decode safely") as e:
        _encoded_size(png.getvalue(), "train[3]")
    assert "shrink it or cut it into smaller images" in str(e.value)  # what to do, as for a file


def test_tfds_unknown_dataset_needs_class_names():
    with pytest.raises(DataError, match="'cityscapes' has no built-in label map"):
        get_source(config("tfds", tfds_name="cityscapes"))


def mock_pets(mask_fn, channels=1):
    """tfds.testing.mock_data for oxford_iiit_pet: 3 examples, 10-12 x 12, mask i from mask_fn(i, h, w)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    import tensorflow as tf

    def as_dataset(self, split, **kwargs):
        specs = self.info.features.get_tensor_info()

        def examples():
            for i in range(3):
                ex = {k: np.zeros([d or 1 for d in s.shape], s.np_dtype) for k, s in specs.items()}
                ex["image"] = rgb(i, 10 + i, 12)
                ex["segmentation_mask"] = mask_fn(i, 10 + i, 12)
                ex["file_name"] = f"pet{i}.jpg".encode()
                yield ex

        signature = {k: tf.TensorSpec(s.shape, s.dtype) for k, s in specs.items()}
        signature["segmentation_mask"] = tf.TensorSpec((None, None, channels), tf.uint8)
        return tf.data.Dataset.from_generator(examples, output_signature=signature)

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_tfds_oxford_pet_through_mock_data(tmp_path):
    with mock_pets(lambda i, h, w: np.random.default_rng(i).integers(1, 4, (h, w, 1), dtype=np.uint8)):
        source = get_source(config("tfds", path=str(tmp_path)))
        split = source.load("val")
    assert source.class_names == ("pet", "background", "border")
    assert list(split.names) == ["pet0.jpg", "pet1.jpg", "pet2.jpg"]
    assert split.images[1].shape == (11, 12, 3) and split.labels[1].shape == (11, 12)
    assert set(np.unique(np.concatenate([lab.ravel() for lab in split.labels]))) == {
        0,
        1,
        2,
    }


def test_tfds_colour_coded_masks_read_through_color_map_or_named(tmp_path):
    """An RGB mask (of a dataset given class_names, so no built-in value map): read through
    data.color_map as for folders; without one, an error that names the mask's key and its colours for
    data.color_map, not a size mismatch."""
    colors = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200)], np.uint8)
    ids = [np.random.default_rng(i).integers(0, 3, (10 + i, 12), dtype=np.uint8) for i in range(3)]
    with mock_pets(lambda i, h, w: colors[ids[i]], channels=3):
        named = config("tfds", path=str(tmp_path), class_names=("r", "g", "b"), color_map=colors.tolist())
        split = get_source(named).load("val")
        error = r"^pet0.jpg \(data.tfds_mask_key='segmentation_mask'\): RGB mask with 3 distinct colours \(most common"
        with pytest.raises(DataError, match=error + r".* --config.data.color_map='\(\("):
            get_source(config("tfds", path=str(tmp_path))).load("val")
    for got, want in zip(split.labels, ids):
        np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def tiny_seg(tmp_path_factory):
    """A tiny dataset prepared in a temporary folder: 'fcn_tiny_seg', train 10 and test 2 examples, example
    i an rgb(i) image of 4+i x 5 with a mask of i % 2 (an Image feature, H x W x 1); returns its data_dir."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")

    class FcnTinySeg(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image, mask = tfds.features.Image(shape=(None, None, 3)), tfds.features.Image(shape=(None, None, 1))
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": image, "segmentation_mask": mask, "file_name": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(10)), "test": self._generate_examples(range(10, 12))}

        def _generate_examples(self, ids):
            for i in ids:
                mask = np.full((4 + i, 5, 1), i % 2, np.uint8)
                yield i, {"image": rgb(i, 4 + i, 5), "segmentation_mask": mask, "file_name": f"ex{i}"}

    path = tmp_path_factory.mktemp("tfds")
    FcnTinySeg(data_dir=str(path)).download_and_prepare()
    return str(path)


def test_tfds_split_the_dataset_lacks_names_the_config_key(tiny_seg):
    """A prepared local dataset (a tiny builder): a TFDS split it does not have is a DataError naming
    data.tfds_splits.KEY and the splits it has, not a ValueError traceback."""
    splits = {"train": "train", "val": "validation"}
    c = config("tfds", path=tiny_seg, tfds_name="fcn_tiny_seg", class_names=("a", "b"), tfds_splits=splits)
    source = get_source(c)
    assert len(source.load("train")) == 10
    with pytest.raises(DataError, match=r"data.tfds_splits.val='validation': Unknown split .*'train', 'test'"):
        source.load("val")


def test_tfds_unknown_dataset_name_or_version_is_one_line_naming_the_key(tiny_seg):
    """A mistyped data.tfds_name (with class_names, so no built-in label map is looked up): one line naming
    the key, tfds's suggestion and data.path, not tfds's traceback listing every dataset it knows."""
    for name, path, want in [
        (
            "oxford_iiit_pets",
            "",
            r"'oxford_iiit_pets': no such tensorflow-datasets dataset \(did you mean oxford_iiit_pet\?\)$",
        ),
        (
            "fcn_tiny_sge",
            tiny_seg,
            r"'fcn_tiny_sge': no such tensorflow-datasets dataset.*, nor one prepared in data.path=",
        ),
        ("oxford_iiit_pet:9.*.*", "", r"'oxford_iiit_pet:9.\*.\*': .*cannot be loaded at version 9.\*.\*, only: "),
    ]:
        c = config("tfds", path=path, tfds_name=name, class_names=("a", "b"))
        with pytest.raises(DataError, match=r"^data.tfds_name=" + want) as e:
            get_source(c).load("train")
        assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)


def test_tfds_slices_split_the_examples_and_an_empty_or_malformed_one_is_one_line(tiny_seg):
    """train[:80%] and train[80%:] hold 8 and 2 of the 10 examples, none in both; a slice that selects
    nothing, or one tfds cannot parse, is one DataError line naming data.tfds_splits.KEY (the empty one
    was tfds's 'Instruction [] corresponds to no data!' traceback)."""
    splits = {"train": "train[:80%]", "val": "train[80%:]", "empty": "train[10:]", "bad": "train[:80%"}
    c = config("tfds", path=tiny_seg, tfds_name="fcn_tiny_seg", class_names=("a", "b"), tfds_splits=splits)
    source = get_source(c)
    train, val = source.load("train"), source.load("val")
    assert (len(train), len(val)) == (8, 2)
    assert sorted(train.names + val.names) == sorted(f"ex{i}" for i in range(10))
    for name, image in zip(train.names + val.names, train.images + val.images):
        np.testing.assert_array_equal(image, rgb(int(name[2:]), 4 + int(name[2:]), 5))
    with pytest.raises(DataError, match=r"^data.tfds_splits.empty='train\[10:\]': selects no examples of fcn_tiny_seg"):
        source.load("empty")
    with pytest.raises(DataError, match=r"^data.tfds_splits.bad='train\[:80%': Error parsing split") as e:
        source.load("bad")
    assert "\n" not in str(e.value)


def test_tfds_without_tensorflow_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    from configs import tiny
    from fcn.cli import run_training
    from fcn.data.tfds import _import_tfds

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` raises ImportError
    with pytest.raises(
        DataError, match=r"data.source='tfds' needs tensorflow .*pip install tensorflow-cpu tensorflow-datasets"
    ):
        _import_tfds()
    c = tiny.get_config()
    c.data.source = "tfds"  # oxford_iiit_pet, which has its label map
    assert run_training(c, str(tmp_path / "run")) == 1  # an error the user can act on, not a traceback
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'.[tfds]'" in errors[0], errors


def test_tfds_corrupt_image_is_a_data_error_that_skip_bad_skips(tmp_path):
    """A prepared dataset whose example 1 holds a truncated PNG: TF's InvalidArgumentError ended the
    run even with data.skip_bad; now it is one DataError naming the example and key, and skipped."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(rgb(0, 6, 5)).save(png, format="PNG")
    (tmp_path / "bad.png").write_bytes(png.getvalue()[:40])  # tfds keeps a file's bytes as they are

    class FcnBadSeg(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image, mask = tfds.features.Image(shape=(None, None, 3)), tfds.features.Image(shape=(None, None, 1))
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"image": image, "segmentation_mask": mask})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                image = str(tmp_path / "bad.png") if i == 1 else rgb(i, 6, 5)
                yield i, {"image": image, "segmentation_mask": np.zeros((6, 5, 1), np.uint8)}

    FcnBadSeg(data_dir=str(tmp_path / "d")).download_and_prepare()
    kw = dict(path=str(tmp_path / "d"), tfds_name="fcn_bad_seg", class_names=("a", "b"))
    with pytest.raises(DataError, match=r"^train\[1\]: 'image' is a corrupt or truncated image \(Invalid PNG"):
        get_source(config("tfds", **kw)).load("train")
    assert get_source(config("tfds", skip_bad=True, **kw)).load("train").names == ["train[0]", "train[2]"]


@pytest.mark.parametrize("alpha", [False, True])
def test_tfds_grayscale_mask_in_a_colour_image_feature_reads_its_values(tmp_path, alpha):
    """A mask feature declared tfds.features.Image() (3 channels, its default) holding grayscale PNGs
    decodes to three equal channels (RGBA: four): read as the grayscale mask it is, as for folders. It was
    refused as colour-coded, with advice to set data.color_map."""
    trimaps = [np.random.default_rng(i).integers(1, 4, (10 + i, 12), dtype=np.uint8) for i in range(3)]

    def mask(i, h, w):
        planes = [trimaps[i]] * 3 + ([np.full_like(trimaps[i], 255)] if alpha else [])
        return np.stack(planes, axis=-1)

    with mock_pets(mask, channels=4 if alpha else 3):
        split = get_source(config("tfds", path=str(tmp_path))).load("val")
    for got, want in zip(split.labels, trimaps):
        np.testing.assert_array_equal(got, want - 1)  # oxford_iiit_pet's 1, 2, 3 -> 0, 1, 2


def test_tfds_data_path_with_a_tilde_is_the_home_folder(tiny_seg, tmp_path, monkeypatch):
    """data.path='~/DIR', as camvid and folder read it: TFDS took it literally, found nothing prepared and
    prepared (or downloaded) the dataset afresh into a folder named '~' in the working directory."""
    from pathlib import Path

    monkeypatch.setenv("HOME", str(Path(tiny_seg).parent))
    monkeypatch.chdir(tmp_path)
    c = config("tfds", path=f"~/{Path(tiny_seg).name}", tfds_name="fcn_tiny_seg", class_names=("a", "b"))
    assert len(get_source(c).load("train")) == 10
    assert not (tmp_path / "~").exists()


def test_tfds_dataset_to_download_by_hand_is_one_line_naming_its_folder(tmp_path):
    """A dataset whose files must be downloaded by hand (cityscapes, with a registration) and are not in
    its manual folder yet: TFDS's AssertionError ended the run in a traceback; now one DataError line
    naming the dataset, the folder to fill and TFDS's instructions."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")

    class FcnManualSeg(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Register at example.org,\nthen put seg.zip here."

        def _info(self):
            image, mask = tfds.features.Image(shape=(None, None, 3)), tfds.features.Image(shape=(None, None, 1))
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"image": image, "segmentation_mask": mask})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(dl_manager.manual_dir)}

        def _generate_examples(self, folder):
            yield from ()

    c = config("tfds", path=str(tmp_path), tfds_name="fcn_manual_seg", class_names=("a", "b"))
    with pytest.raises(DataError, match=r"^data.tfds_name='fcn_manual_seg': ") as e:
        get_source(c).load("train")
    text = str(e.value)
    assert str(tmp_path / "downloads" / "manual") in text and "then put seg.zip here" in text, text
    assert "\n" not in text, text
