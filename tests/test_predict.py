"""`python -m fcn.predict`: class-map and overlay PNGs per input, bad inputs named and skipped."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_inference import train_tiny

import fcn
from fcn.data.synthetic import make_example
from fcn.inference import load
from fcn.predict import expand_inputs, main, output_names, predict_files


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory)


def _write(path, h, w, seed=0):
    image, _ = make_example(seed, 0, (h, w))
    Image.fromarray(image).save(path)
    return image


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_writes_palette_class_maps_and_overlays(workdir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = {"a": _write(inputs / "a.png", 30, 40, 1), "b": _write(inputs / "b.jpg", 25, 33, 2)}
    _write(tmp_path / "c.png", 70, 20, 3)
    before = _digests(inputs)
    out = tmp_path / "out"
    assert main(["--workdir", workdir, "--out", str(out), str(inputs), str(tmp_path / "c.png")]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        f"{n}_{kind}.png" for n in "abc" for kind in ("classes", "overlay")
    ]
    seg = load(workdir)
    classes = Image.open(out / "a_classes.png")
    assert classes.mode == "P"  # opens as colours, stores class ids
    np.testing.assert_array_equal(np.asarray(classes), seg.predict(images["a"]))
    palette = np.asarray(classes.getpalette()[:12], np.uint8).reshape(4, 3)
    np.testing.assert_array_equal(palette, seg.palette)
    overlay = Image.open(out / "b_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (33, 25)
    assert _digests(inputs) == before  # inputs are never modified


def test_bad_inputs_are_named_skipped_and_fail_the_exit_code(workdir, tmp_path, capsys):
    _write(tmp_path / "good.png", 20, 20)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "readme.md").write_text("nothing to see")
    args = ["good.png", "notes.txt", "empty.png", "missing.png", "no_images"]
    out = tmp_path / "out"
    code = main(["--workdir", workdir, "--out", str(out), *(str(tmp_path / a) for a in args)])
    err = capsys.readouterr().err
    assert code == 1
    for name, words in [
        ("notes.txt", "not an image"),
        ("empty.png", "empty file"),
        ("missing.png", "no such file"),
        ("no_images", "no images"),
    ]:
        assert any(name in line and words in line for line in err.splitlines()), (name, err)
    assert (out / "good_classes.png").exists() and (out / "good_overlay.png").exists()
    assert "4 inputs failed" in err


def test_one_bad_input_is_counted_in_the_singular(workdir, tmp_path, capsys):
    _write(tmp_path / "good.png", 20, 20)
    (tmp_path / "bad.png").write_text("not an image")
    assert main(["--workdir", workdir, "--out", str(tmp_path / "out"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "1 input failed:" in err and "bad.png" in err


def test_nothing_to_predict_fails_before_loading_the_model(tmp_path, capsys):
    (tmp_path / "empty_dir").mkdir()
    assert main(["--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "o"), str(tmp_path / "empty_dir")]) == 1
    assert "empty_dir: directory with no images" in capsys.readouterr().err


def test_a_bad_workdir_is_reported(tmp_path, capsys):
    _write(tmp_path / "x.png", 8, 8)
    assert main(["--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "o"), str(tmp_path / "x.png")]) == 1
    assert "no_run" in capsys.readouterr().err


def test_outputs_next_to_inputs_never_overwrite_them(workdir, tmp_path):
    _write(tmp_path / "a.png", 16, 16, 1)
    _write(tmp_path / "a_classes.png", 16, 16, 2)  # an input that looks like one of our outputs
    before = _digests(tmp_path)
    assert (
        main(["--workdir", workdir, "--out", str(tmp_path), str(tmp_path / "a.png"), str(tmp_path / "a_classes.png")])
        == 0
    )
    after = _digests(tmp_path)
    assert all(after[name] == digest for name, digest in before.items())
    assert {"a-2_classes.png", "a-2_overlay.png", "a_classes_classes.png"} <= set(after)


def test_same_stem_in_two_folders_gets_two_outputs_and_a_note_saying_which(workdir, tmp_path, capsys):
    """a/x.png and b/x.jpg: the second's outputs were x-2_*.png with nothing saying which input
    they belong to."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _write(tmp_path / "a" / "x.png", 20, 24, 1), _write(tmp_path / "b" / "x.jpg", 28, 16, 2)
    out = tmp_path / "out"
    assert main(["--workdir", workdir, "--out", str(out), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    seg = load(workdir)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "x_classes.png")), seg.predict(first))
    second_read = np.asarray(Image.open(tmp_path / "b" / "x.jpg"))  # JPEG: compare with what was read
    np.testing.assert_array_equal(np.asarray(Image.open(out / "x-2_classes.png")), seg.predict(second_read))
    assert second.shape == second_read.shape
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'b' / 'x.jpg'} is written as x-2_classes.png and x-2_overlay.png" in err
    assert str(tmp_path / "a" / "x.png") not in err  # the first keeps its name: no note


def test_files_in_batches_with_failures_among_them(workdir, tmp_path):
    """Files are read ahead, predicted a batch at a time and written behind: each class map is the
    file's own prediction, and a bad file, unreadable or unwritable, fails alone, reported in order."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    images = {}
    for i in range(11):  # three batches of 4 and more, sizes varied
        name = f"f{i:02d}.png"
        if i in (3, 7):
            (inputs / name).write_text("not an image")
        else:
            images[name] = _write(inputs / name, 20 + 4 * (i % 3), 24 + 8 * (i % 2), i)
    (out / "f05_classes.png").mkdir()  # its class map cannot be written there
    seg = load(workdir)
    files = sorted(inputs.iterdir())
    errors = predict_files(seg, files, out, workers=3)
    assert [e.split(":")[0] for e in errors] == [str(inputs / n) for n in ("f03.png", "f05.png", "f07.png")]
    assert "not an image" in errors[0] and "not an image" in errors[2]
    assert not list(out.glob("*.tmp"))  # the failed write left nothing behind
    for name, image in images.items():
        if name != "f05.png":
            classes = np.asarray(Image.open(out / name.replace(".png", "_classes.png")))
            np.testing.assert_array_equal(classes, seg.predict(image), err_msg=name)


def test_bad_out_or_alpha_fail_in_words_before_loading_the_model(tmp_path, capsys):
    _write(tmp_path / "x.png", 8, 8)
    (tmp_path / "notes.txt").write_text("a file where --out would need a folder")
    no_run = str(tmp_path / "no_run")  # never loaded: the arguments fail first
    out = tmp_path / "notes.txt" / "out"
    assert main(["--workdir", no_run, "--out", str(out), str(tmp_path / "x.png")]) == 1
    assert f"--out {out}: {tmp_path / 'notes.txt'} is a file, not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # an opacity past 1 wrapped the overlay's colours around
        main(["--workdir", no_run, "--out", str(tmp_path / "o"), "--alpha", "1.5", str(tmp_path / "x.png")])
    assert info.value.code == 2 and "--alpha=1.5: expected an opacity between 0 and 1" in capsys.readouterr().err
    for flags in (["--tile", "0"], ["--overlap", "-8"]):  # the predictor took 2**depth px tiles, or no overlap
        with pytest.raises(SystemExit) as info:
            main(["--workdir", no_run, "--out", str(tmp_path / "o"), *flags, str(tmp_path / "x.png")])
        assert info.value.code == 2 and "expected a tile of 1 px or more" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "x.png"]


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(workdir, tmp_path, monkeypatch, capsys):
    # --out="$OUT" with OUT unset: Path("") is ".", where the outputs went among the user's files
    _write(tmp_path / "x.png", 8, 8)
    monkeypatch.chdir(tmp_path)
    assert main(["--workdir", workdir, "--out", "", "x.png"]) == 1
    assert "error: --out is an empty path; name a folder for the outputs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_a_corrupt_checkpoint_is_one_error_naming_it(workdir, tmp_path):
    """Array files cut short (a partial copy): an error line that names the checkpoint, exit code 1.
    In a process of its own: orbax's other reads of the broken arrays are left pending, and are
    reported (unraisable exceptions) when they end after the restore gave up."""
    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    data = list(broken.glob("best/*/default/ocdbt.process_0/d/*"))
    assert data, "orbax's layout changed: cut other files short"
    for f in data:
        f.write_bytes(f.read_bytes()[:20])
    _write(tmp_path / "x.png", 8, 8)
    args = ["--workdir", str(broken), "--out", str(tmp_path / "o"), str(tmp_path / "x.png")]
    done = subprocess.run([sys.executable, "-m", "fcn.predict", *args], capture_output=True, text=True)
    assert done.returncode == 1
    _, _, rest = done.stderr.partition("error: ")
    line = "error: " + rest.splitlines()[0]
    # No traceback of fcn's (an uncaught error's would pass through fcn/predict.py): only orbax's abandoned
    # reads, reported as unraisable from threads of their own (on a closed event loop, or orbax's own
    # "Encountered error while reading array index" on a busy machine), before, after or amid the error
    # line (docs/reliability.md says so).
    fcn_dir = f'File "{os.path.dirname(fcn.__file__)}{os.sep}'
    assert not [ln for ln in done.stderr.splitlines() if fcn_dir in ln], done.stderr
    assert line.startswith(f"error: cannot load {broken}: cannot read checkpoint ") and "best: " in line
    assert "incomplete or corrupt" in line
    assert not (tmp_path / "o").exists()


def test_names_that_differ_only_in_case_get_outputs_of_their_own(tmp_path):
    """a/IMG.png and b/img.jpg were written as IMG_classes.png and img_classes.png: one file on a
    case-insensitive file system (macOS, Windows), so the second overwrote the first, and an input
    A_classes.png beside a.png was overwritten by a.png's class map."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = [tmp_path / "a" / "IMG.png", tmp_path / "b" / "img.jpg", tmp_path / "a.png", tmp_path / "A_classes.png"]
    names = output_names(files, tmp_path)
    assert [c.name for c, _ in names] == [
        "IMG_classes.png",
        "img-2_classes.png",
        "a-2_classes.png",
        "A_classes_classes.png",
    ]
    assert len({o.name.casefold() for pair in names for o in pair}) == 8


def test_a_directory_that_cannot_be_listed_is_named_and_the_others_kept(tmp_path, monkeypatch):
    """A folder without read permission raised PermissionError out of the command (a traceback, no
    image predicted); it is one error line now, as a missing file is."""
    import pathlib

    _write(tmp_path / "x.png", 8, 8)
    (tmp_path / "locked").mkdir()
    iterdir = pathlib.Path.iterdir

    def refuse(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", refuse)
    files, errors = expand_inputs([str(tmp_path / "locked"), str(tmp_path / "x.png")])
    assert files == [tmp_path / "x.png"]
    assert errors == [f"{tmp_path / 'locked'}: cannot list directory (Permission denied)"]


def test_in_a_log_file_predicting_shows_its_progress(workdir, tmp_path, capsys):
    """stderr no terminal (a job's log): the bar was silent, and nothing said what was under way."""
    for i in range(3):
        _write(tmp_path / f"{i}.png", 20, 20, i)
    assert (
        main(["--workdir", workdir, "--out", str(tmp_path / "out"), *(str(tmp_path / f"{i}.png") for i in range(3))])
        == 0
    )
    err = capsys.readouterr().err
    assert "predicting:   0%" in err and "3/3 [" in err, err


def test_a_directory_gives_its_images_but_not_its_hidden_files(tmp_path):
    """A folder copied from macOS holds `._x.png` (AppleDouble metadata, no image): each was predicted,
    failed as 'not an image format PIL can read' and made the command exit 1. Hidden files are not
    images, as in the folder source; one named on the command line is still predicted."""
    _write(tmp_path / "x.png", 8, 8)
    (tmp_path / "._x.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    _write(tmp_path / ".thumb.png", 8, 8)
    files, errors = expand_inputs([str(tmp_path)])
    assert (files, errors) == ([tmp_path / "x.png"], [])
    files, errors = expand_inputs([str(tmp_path / ".thumb.png")])
    assert (files, errors) == ([tmp_path / ".thumb.png"], [])


def test_the_out_folder_among_the_inputs_holding_only_our_outputs_is_no_failure(tmp_path):
    """`--out frames/preds frames/*`, run a second time: the glob names frames/preds, whose images are all
    the first run's outputs. It was reported as a directory with no images, so the run that predicted
    every image exited 1. A folder with no images at all is still named."""
    frames, out = tmp_path / "frames", tmp_path / "frames" / "preds"
    out.mkdir(parents=True)
    _write(frames / "a.png", 8, 8)
    _write(out / "a_classes.png", 8, 8)
    _write(out / "a_overlay.png", 8, 8)
    (tmp_path / "empty").mkdir()
    files, errors = expand_inputs([str(frames / "a.png"), str(out), str(tmp_path / "empty")], out)
    assert files == [frames / "a.png"]
    assert [e.split(":")[0] for e in errors] == [str(tmp_path / "empty")]


def test_an_empty_out_folder_among_the_inputs_is_no_failure(tmp_path):
    """`mkdir frames/preds; --out frames/preds frames/*`: the glob names the empty out folder, which was
    reported as a directory with no images, so the run that predicted every image exited 1."""
    frames, out = tmp_path / "frames", tmp_path / "frames" / "preds"
    out.mkdir(parents=True)
    _write(frames / "a.png", 8, 8)
    files, errors = expand_inputs([str(frames / "a.png"), str(out)], out)
    assert (files, errors) == ([frames / "a.png"], [])
