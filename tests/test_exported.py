"""`fcn.load_exported(dir).predict` refusing what the artifact cannot run, naming the file or size (no training:
small UNets exported directly), and tiling large images as fcn.load's predictor does. The export itself and
its agreement with the model: tests/test_export.py."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from fcn.export import export_model, load_exported
from fcn.inference import Segmenter
from fcn.model import UNet

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("flax", "optax", "orbax", "ml_collections", "tensorflow", "tensorflow_datasets")


def _fresh(code: str) -> list[str]:
    """The lines a fresh interpreter prints running code in the checkout."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_importing_the_exported_model_imports_no_model_or_training_code():
    """`import fcn.exported` (and `from fcn import load_exported`, as README has it) ran fcn/__init__.py's
    eager imports of the model, the predictor and the summary: flax and optax, for an artifact that
    needs jax and numpy alone. fcn's other names (and `fcn.ops`) still come, on first use; fcn.summary
    stays the function."""
    for statement in ("import fcn.exported", "from fcn import load_exported"):
        heavy = f"sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))"
        assert _fresh(f"import sys\n{statement}\nprint({heavy})") == ["[]"], statement
    assert _fresh(
        """
        import fcn
        from fcn.summary import summary
        print(fcn.summary is summary, fcn.UNet.__module__, fcn.load.__module__, fcn.Segmenter.__module__)
        print(fcn.predict_proba.__module__, fcn.load_exported.__module__, set(fcn.__all__) <= set(dir(fcn)))
        """
    ) == ["True fcn.model fcn.inference fcn.inference", "fcn.model fcn.exported True"]
    assert _fresh("import fcn\nprint(fcn.ops.__name__, fcn.data.DataError.__name__)") == ["fcn.ops DataError"]


def test_the_data_modules_the_eager_imports_made_attributes_still_are():
    """`import fcn; fcn.data.images.read_mask(...)` (and `import fcn.data`, then `fcn.data.labels`) worked while
    fcn/__init__.py imported the predictor, which imported them; `fcn.data` alone imports neither."""
    for statement in ("import fcn", "import fcn.data"):
        code = f"{statement}\nprint(fcn.data.images.read_mask.__name__, fcn.data.labels.__name__)"
        assert _fresh(code) == ["read_mask fcn.data.labels"], statement
    assert _fresh("import fcn.data\nprint(hasattr(fcn.data, 'no_such_module'))") == ["False"]


def test_running_an_exported_model_imports_no_model_or_training_code(tmp_path):
    """The first predict imported fcn.inference for its image reading (float_batch, resize_channels), and
    with it flax and optax; they live in fcn/inputs.py now. Whole, tiled, shrunk and resized back."""
    _export(tmp_path, max_size=48)
    got = _fresh(
        f"""
        import sys
        import numpy as np
        from fcn import load_exported
        exported = load_exported({str(tmp_path)!r}, tile=32, overlap=8)
        image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8)
        print(exported.predict(image).shape, exported.predict_proba(image[:20, :30] / 255).shape)
        print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
        """
    )
    assert got == ["(70, 90) (20, 30, 3)", "[]"]


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


def _export(tmp_path, max_size=0, **kwargs):
    model = UNet(num_classes=3, features=4, depth=2, rngs=nnx.Rngs(0))
    model.eval()
    meta = {"class_names": ("a", "b", "c"), "max_size": max_size}
    export_model(model, tmp_path, meta, saved_model=False, **kwargs)
    return model


def test_a_large_image_is_tiled_as_the_predictor_tiles_it(tmp_path):
    """ExportedModel ran every image whole, so a large photo needed the whole image's activations at
    once (a 2000 x 2000 image, width-32 depth-4 model: 2.8 GB peak RSS, 0.9 GB tiled); it now cuts one
    over `tile` into the predictor's tiles (fcn.canvas) and gives fcn.load's logits."""
    model = _export(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8)
    exported = load_exported(tmp_path, tile=32, overlap=8)
    assert exported.tiles == (32, 8)
    expected = Segmenter(model, ("a", "b", "c"), tile=32, overlap=8)._flipped(image, hflip=False)
    logits = exported.logits(image)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    np.testing.assert_array_equal(exported.predict(image), expected.argmax(-1))
    whole = np.asarray(exported.exported.call(image[None].astype(np.float32) / 255))[0]
    assert np.abs(logits - whole).max() > 1e-3  # tiles lack context near their edges: not the whole run


def test_images_within_a_tile_run_whole_and_one_size_exports_are_never_tiled(tmp_path):
    """No change for an image within the tile size, for an artifact of one size (--size), nor for an
    export from before model.json held "multiple": model.jax's own logits, bit for bit."""
    _export(tmp_path / "any")
    x = np.random.default_rng(1).random((2, 30, 20, 3), np.float32)
    exported = load_exported(tmp_path / "any", tile=32)
    np.testing.assert_array_equal(exported.logits(x), np.asarray(exported.exported.call(x)))

    _export(tmp_path / "fixed", size=(40, 50))
    fixed = load_exported(tmp_path / "fixed", tile=32)
    x = np.random.default_rng(2).random((40, 50, 3), np.float32)
    assert fixed.tiles is None
    np.testing.assert_array_equal(fixed.logits(x), np.asarray(fixed.exported.call(x[None]))[0])

    meta = json.loads((tmp_path / "any" / "model.json").read_text())
    del meta["multiple"]  # as an export from before tiling: its 2**depth is unknown
    (tmp_path / "any" / "model.json").write_text(json.dumps(meta))
    old = load_exported(tmp_path / "any", tile=32)
    assert old.tiles is None
    np.testing.assert_array_equal(old.logits(x), np.asarray(old.exported.call(x[None]))[0])
