"""`fcn.export --out`: what an export may replace there, and what it refuses to touch; and the StableHLO
version of its TensorFlow artifacts."""

import pytest

import fcn.export
from fcn.export import main
from tests.test_data_sources import snapshot


def stub_writer(staging, *args):
    (staging / "model.jax").write_bytes(b"artifact")
    (staging / "model.json").write_text("{}")
    return ["model.jax", "model.json"]


def test_files_of_the_artifacts_names_that_no_export_wrote_are_refused_and_kept(tmp_path, monkeypatch, capsys):
    """An --out holding a user's own model.tflite and saved_model/, with no model.json: the export moved
    them out with the artifacts of an earlier export, and deleted them, though it leaves other files alone."""
    out = tmp_path / "deploy"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "saved_model.pb").write_bytes(b"theirs")
    (out / "model.tflite").write_bytes(b"theirs")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)  # bytes and modification times
    # Refused before the workdir is read: this one does not exist.
    assert main(["--workdir", str(tmp_path / "run"), "--out", str(out), "--no_saved_model"]) == 1
    err = capsys.readouterr().err
    assert f"error: --out {out} holds saved_model/, model.tflite but no model.json: not an earlier export" in err
    assert "choose another --out, or move them away" in err
    monkeypatch.setattr(fcn.export, "_write_artifacts", lambda fn, staging, *args: stub_writer(staging))
    with pytest.raises(FileExistsError, match="holds saved_model/, model.tflite but no model.json"):
        fcn.export._export_model(None, out, {}, None, False, None, None)
    assert snapshot(out) == before


def test_a_swap_a_kill_interrupted_is_replaced_by_the_next_export(tmp_path, monkeypatch):
    """A killed swap leaves artifacts without model.json, and its staging folder: those are an export's."""
    out = tmp_path / "exported"
    staging = out / ".fcn-export-killed"
    staging.mkdir(parents=True)
    (staging / ".fcn-staging-owner").write_text("pid 1 on elsewhere")  # no process holds it: swept
    (out / "model.jax").write_bytes(b"old")
    (out / "model.tflite").write_bytes(b"old")
    monkeypatch.setattr(fcn.export, "_write_artifacts", lambda fn, staging, *args: stub_writer(staging))
    fcn.export._export_model(None, out, {}, None, False, None, None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"model.jax": b"artifact", "model.json": b"{}"}


def test_the_tensorflow_artifacts_hold_stablehlo_the_installed_tensorflow_reads():
    """jax 0.11.2 serialized StableHLO 1.18.0 where TF 2.21 reads 1.13.7: its SavedModel was written and then
    refused by TF when run (tests/test_export.py runs one; this checks the version asked for, on any jax)."""
    pytest.importorskip("tensorflow")
    from jax._src.lib.mlir.dialects import hlo
    from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_hlo

    from fcn.export_tf import _stablehlo_tf_reads

    requirement, tf_version = hlo.StablehloCompatibilityRequirement.WEEK_4, tf_hlo.get_current_version()
    jax_asks = hlo.get_version_from_compatibility_requirement(requirement)
    with _stablehlo_tf_reads():
        asked = hlo.get_version_from_compatibility_requirement(requirement)
    assert asked == tf_hlo.get_smaller_version(jax_asks, tf_version), (asked, jax_asks, tf_version)
    assert tf_hlo.get_smaller_version(asked, tf_version) == asked  # no newer than TF reads
    assert hlo.get_version_from_compatibility_requirement(requirement) == jax_asks  # put back
