"""One way to name a trained run's checkpoint (fcn.trained): a workdir with best|latest, or W/checkpoints/N
or W/best/N, the same for fcn.evaluate, fcn.predict, fcn.export and fcn.load."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_inference import train_tiny

from configs import tiny
from fcn import checkpoint, evaluate, export, predict, saved_config, trained
from fcn.checkpoint import CheckpointError
from fcn.inference import load

SCORES = ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return Path(train_tiny(tmp_path_factory))


def test_resolve_names_a_workdir_or_one_checkpoint(tmp_path):
    w = tmp_path / "run"
    assert trained.resolve(w) == (w, "best", None)
    assert trained.resolve(w, "latest") == (w, "latest", None)
    assert trained.resolve(f"{w}/checkpoints/3/") == (w, "latest", 3)  # a folder names its own, whatever `which`
    assert trained.resolve(w / "best" / "6", "latest") == (w, "best", 6)
    with pytest.raises(ValueError, match="which='last': expected 'best' or 'latest'"):
        trained.resolve(w, "last")


def test_evaluate_one_checkpoint_folder_gives_that_steps_scores_beside_the_workdirs_report(workdir, tmp_path):
    """`python -m fcn.evaluate --workdir W/checkpoints/N` failed ("config.json not found: is W/checkpoints/N a
    workdir"): no saved step but the best and the latest could be evaluated. Each step the training evaluated
    scores as the training's own evaluation at it (metrics.jsonl), in eval_val_stepN.json and pictures;
    the workdir's eval_val.json (the best's report) is left as it was."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    logged = {
        r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval_mean_iou" in r
    }
    assert len(logged) >= 2 and len({logged[s]["eval_mean_iou"] for s in logged}) == len(logged)  # steps tell apart
    (run / "eval_val.json").write_text('{"step": "the best one"}')
    for step in sorted(logged):
        assert evaluate.main(["--workdir", str(run / "checkpoints" / str(step)), "--examples", "1"]) == 0
        rep = json.loads((run / f"eval_val_step{step}.json").read_text())
        assert (rep["step"], rep["checkpoint"]) == (step, f"checkpoints/{step}")
        assert {k: rep[k] for k in SCORES} == {k: logged[step][f"eval_{k}"] for k in SCORES}
        for picture in ("confusion", "iou", "examples"):
            assert (run / f"eval_val_step{step}_{picture}.png").stat().st_size > 1000
    latest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    (run / f"eval_val_step{latest}.json").unlink()
    # --checkpoint latest is named by its step too: it used to write eval_val.json, over the best's report
    assert evaluate.main(["--workdir", str(run), "--checkpoint", "latest", "--examples", "0"]) == 0
    assert json.loads((run / f"eval_val_step{latest}.json").read_text())["checkpoint"] == f"checkpoints/{latest}"
    assert (run / "eval_val.json").read_text() == '{"step": "the best one"}'
    assert not (run / "checkpoints" / "eval_val.json").exists()


def test_the_four_commands_read_checkpoints_through_one_resolver_with_one_error(workdir, tmp_path, monkeypatch, capsys):
    """A step not on disk: the same message, naming the steps the folder holds, from all four; each resolves
    its --workdir with fcn.trained.resolve."""
    held = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    missing = workdir / "checkpoints" / "99"
    message = (
        f"no checkpoint 99 in {workdir / 'checkpoints'}: it holds steps {', '.join(map(str, held))} "
        "(the latest config.keep_checkpoints are kept)"
    )
    resolved = []
    resolve = trained.resolve
    monkeypatch.setattr(
        trained, "resolve", lambda path, which="best": resolved.append(str(path)) or resolve(path, which)
    )
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    commands = {
        "evaluate": lambda: evaluate.main(["--workdir", str(missing), "--examples", "0"]),
        "predict": lambda: predict.main([str(image), "--workdir", str(missing), "--out", str(tmp_path / "p")]),
        "export": lambda: export.main(["--workdir", str(missing), "--out", str(tmp_path / "e")]),
    }
    for name, command in commands.items():
        resolved.clear()
        assert command() == 1, name
        assert message in capsys.readouterr().err, name
        assert str(missing) in resolved, name
    resolved.clear()
    with pytest.raises(CheckpointError) as e:
        load(missing)
    assert str(e.value) == message and str(missing) in resolved
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists() and not missing.exists()


@pytest.mark.parametrize("name", ["config.json", "dataset.json"])
@pytest.mark.parametrize(
    "text, said",
    [
        ('{"class_names": ', "is not valid JSON (Expecting value: line 1 column 17 (char 16))"),
        ("[]", "holds a JSON list, not an object"),
    ],
)
def test_a_workdir_file_that_is_no_json_object_is_named(workdir, tmp_path, capsys, name, text, said):
    """A config.json or dataset.json cut short (a partial copy) or mistyped in an edit: fcn.evaluate printed
    json's own words alone ("error: Expecting value: line 2 column 1 (char 12)"), naming no file, and
    fcn.load raised the same; valid JSON that is not an object ('[]') ended in an AttributeError or a
    TypeError. Now the error names the file and what is wrong with it."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    (run / name).write_text(text)
    assert evaluate.main(["--workdir", str(run), "--examples", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: {run / name} {said}" in err
    with pytest.raises(CheckpointError, match=re.escape(f"{run / name} {said}")):
        load(run)
    assert not list(run.glob("eval_*"))


def test_a_config_json_missing_keys_is_an_error_naming_the_file_and_the_keys(workdir, tmp_path, capsys):
    """A config.json without fields every fcn has written (edited by hand, damaged): the four commands ended in
    ml_collections' traceback, AttributeError: "'features'", naming neither the file nor the section. Now the
    commands print one error line naming both, exit code 1, and fcn.load raises a CheckpointError saying the same."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = json.loads((run / "config.json").read_text())
    del config["model"]["features"], config["data"]["source"], config["num_steps"]
    (run / "config.json").write_text(json.dumps(config))
    message = f"{run / 'config.json'} lacks data.source, model.features, num_steps"
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for command in (
        lambda: evaluate.main(["--workdir", str(run), "--examples", "0"]),
        lambda: predict.main([str(image), "--workdir", str(run), "--out", str(tmp_path / "p")]),
        lambda: export.main(["--workdir", str(run), "--out", str(tmp_path / "e")]),
    ):
        assert command() == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load(run)
    assert not list(run.glob("eval_*")) and not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


def test_a_workdir_from_before_the_later_fields_is_evaluated_and_resumed(workdir, tmp_path, capsys):
    """A config.json written before model.input_scale, model.conv_impl, loss.fused_head and the data's storage
    fields: fcn.evaluate ended in AttributeError: "'input_scale'", and a resumed run was refused ("model.input_scale:
    workdir has {}, config has 1.0"). Each is read as what the runs before it did (saved_config.LATER_FIELDS)."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = json.loads((run / "config.json").read_text())
    for dotted in saved_config.LATER_FIELDS:
        section, key = dotted.split(".")
        del config[section][key]
    (run / "config.json").write_text(json.dumps(config))
    assert evaluate.main(["--workdir", str(run), "--examples", "0"]) == 0
    assert "mean IoU" in capsys.readouterr().out
    assert load(run).model.input_scale == 1.0
    today = tiny.get_config()
    checkpoint.check_compatible(run, today, len(json.loads((run / "dataset.json").read_text())["class_names"]))
    now = json.loads(today.to_json())
    changes = checkpoint.config_changes(run, now)
    assert changes == [
        f"{f}: {v!r} -> {checkpoint._get(now, f)!r}"
        for f, v in sorted(saved_config.LATER_FIELDS.items())
        if v != checkpoint._get(now, f)
    ]
    # the runs before them used XLA's convolutions and the unfused loss; tiny.py leaves both to "auto"
    assert {"model.conv_impl: 'xla' -> 'auto'", "loss.fused_head: 'off' -> 'auto'"} <= set(changes)


def test_a_report_that_cannot_be_written_is_an_error_naming_it(workdir, tmp_path, capsys):
    """A workdir the user may read but not write (a colleague's runs, a full disk; here a folder in the way of a
    picture): fcn.evaluate printed the scores and then a traceback. Now one line names the file, exit code 1."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    (run / "eval_val_confusion.png").mkdir()
    assert evaluate.main(["--workdir", str(run), "--examples", "0"]) == 1
    out, err = capsys.readouterr()
    assert "mean IoU" in out and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot write {run / 'eval_val_confusion.png'}: Is a directory")


def test_the_report_says_whether_flip_test_time_augmentation_scored_it(workdir, tmp_path, capsys):
    """`--hflip` scores a checkpoint otherwise, into the same eval_val.json, and neither that report nor the
    printed lines said so: two reports of one step with two sets of scores could not be told apart."""
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    for flags, hflip in (([], False), (["--hflip"], True)):
        assert evaluate.main(["--workdir", str(run), "--examples", "0", *flags]) == 0
        rep = json.loads((run / "eval_val.json").read_text())
        assert rep["hflip"] is hflip
        header = capsys.readouterr().out.splitlines()[0]
        assert header.endswith(", with flip test-time augmentation") is hflip, header
