"""`fcn.load_exported(dir).predict` refusing what the artifact cannot run, naming the file or size (no training:
small UNets exported directly). The export itself and its agreement with the model: tests/test_export.py."""

import numpy as np
import pytest
from flax import nnx

from fcn.export import export_model, load_exported
from fcn.model import UNet


def test_a_wrong_size_shrunk_along_one_side_is_named_as_shrunk(tmp_path):
    """A 1 x 40 image under data.max_size=16 runs at 1 x 16: only its width shrinks. The refusal of a
    --size export named the shrunk size only when the height changed, so it said "1x40" alone."""
    model = UNet(num_classes=2, features=4, depth=2, rngs=nnx.Rngs(0))
    model.eval()
    export_model(model, tmp_path, {"class_names": ("a", "b"), "max_size": 16}, saved_model=False, size=(1, 15))
    with pytest.raises(ValueError, match=r"images of size 1x40 \(shrunk to 1x16: data.max_size=16\): .* 1x15 "):
        load_exported(tmp_path).predict(np.zeros((1, 40, 3), np.uint8))


def test_an_export_for_another_platform_is_refused_naming_its_file(tmp_path):
    """Exported with --platforms cuda and run on a CPU, the artifact raised jax.export's error, which names
    neither the file nor the flag that would have made one for this machine."""
    model = UNet(num_classes=2, features=4, depth=2, rngs=nnx.Rngs(0))
    model.eval()
    export_model(model, tmp_path, {"class_names": ("a", "b")}, saved_model=False, platforms=("cuda",))
    exported = load_exported(tmp_path)  # its class names can still be read anywhere
    assert exported.class_names == ("a", "b")
    with pytest.raises(ValueError, match=r"model\.jax: .*cuda.*--platforms") as e:
        exported.predict(np.zeros((5, 6, 3), np.uint8))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).endswith("(python -m fcn.export --platforms cuda,cpu)")


def test_the_flag_it_suggests_names_this_machines_platform(tmp_path, monkeypatch):
    """On a TPU (simulated: jax.export's name for this machine's platform) the suggestion was
    `--platforms cpu,cuda` whatever the machine, a command that made another artifact a TPU refuses."""
    from jax import export

    model = UNet(num_classes=2, features=4, depth=2, rngs=nnx.Rngs(0))
    model.eval()
    export_model(model, tmp_path, {"class_names": ("a", "b")}, saved_model=False, platforms=("cuda", "rocm"))
    monkeypatch.setattr(export, "default_export_platform", lambda: "tpu")
    with pytest.raises(ValueError, match=r"model\.jax: ") as e:
        load_exported(tmp_path).predict(np.zeros((5, 6, 3), np.uint8))
    assert str(e.value).endswith("(python -m fcn.export --platforms cuda,rocm,tpu)")
