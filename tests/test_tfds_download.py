"""configs/pets.py's data as a new user gets it: TFDS downloads Oxford-IIIT Pet and prepares it, here from
archives this test makes and serves on 127.0.0.1 (TFDS's own download and prepare code, no mock)."""

import importlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from fcn.data import DataError, get_source
from tests.test_data_sources import config, rgb
from tests.test_download import server  # noqa: F401 (the fixture)

pytest.importorskip("tensorflow_datasets")

PETS = "tensorflow_datasets.datasets.oxford_iiit_pet.oxford_iiit_pet_dataset_builder"
# name -> (trainval or test, trimap); the trimap's 1 pet, 2 background, 3 border
NAMES = {"Abyssinian_1": "trainval", "beagle_2": "trainval", "Bengal_3": "test"}


def trimap(seed, h=12, w=16):
    return np.random.default_rng(seed).integers(1, 4, (h, w), dtype=np.uint8)


def tar_gz(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def encoded(array, fmt) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def test_pets_downloads_prepares_and_reads_from_a_local_server(server, tmp_path, monkeypatch):  # noqa: F811
    images, notes = {}, {"annotations/trainval.txt": b"", "annotations/test.txt": b""}
    for i, (name, split) in enumerate(NAMES.items()):
        images[f"images/{name}.jpg"] = encoded(rgb(i, 12, 16), "JPEG")
        notes[f"annotations/trimaps/{name}.png"] = encoded(trimap(i), "PNG")
        notes[f"annotations/{split}.txt"] += f"{name} {i + 1} 1 1\n".encode()
    server.routes["/pets/images.tar.gz"] = (tar_gz(images), "ok")
    server.routes["/pets/annotations.tar.gz"] = (tar_gz(notes), "ok")
    monkeypatch.setattr(importlib.import_module(PETS), "_BASE_URL", server.url("/pets"))

    # tensorflow-datasets 4.9.10 imports importlib_resources here without declaring it (its issue #11212)
    source = get_source(config("tfds", tfds_name="oxford_iiit_pet", path=str(tmp_path / "tfds")))
    assert source.class_names == ("pet", "background", "border")
    for split, want in (("train", ["Abyssinian_1", "beagle_2"]), ("val", ["Bengal_3"])):
        examples = source.examples(split)
        assert sorted(n.split(".")[0].split("/")[-1] for n in examples.names) == want, examples.names
        for i, name in enumerate(examples.names):
            image, label = examples.read(i)
            stem = name.split(".")[0].split("/")[-1]
            assert image.shape == (12, 16, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(label, trimap(list(NAMES).index(stem)) - 1)  # 1, 2, 3 -> 0, 1, 2
    assert {path for path, *_ in server.requests} == {"/pets/images.tar.gz", "/pets/annotations.tar.gz"}


def test_pets_download_failure_is_one_data_error_naming_the_dataset_url_and_what_to_do(server, tmp_path, monkeypatch):  # noqa: F811
    server.routes["/pets/images.tar.gz"] = (tar_gz({"images/a.jpg": b"x"}), "ok")  # annotations.tar.gz: 404
    monkeypatch.setattr(importlib.import_module(PETS), "_BASE_URL", server.url("/pets"))
    source = get_source(config("tfds", tfds_name="oxford_iiit_pet", path=str(tmp_path / "tfds")))
    with pytest.raises(DataError) as e:
        source.examples("train")
    text = str(e.value)
    assert text.startswith("data.tfds_name='oxford_iiit_pet': downloading or preparing it in "), text
    assert str(tmp_path / "tfds" / "oxford_iiit_pet") in text and "404" in text, text
    assert server.url("/pets/annotations.tar.gz") in text, text
    assert "tfds build oxford_iiit_pet --data_dir DIR" in text, text
