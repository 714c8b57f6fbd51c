"""With data.max_size, evaluation scores at the label files' own resolution, as `fcn.load(...).predict` predicts."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_inference import train_tiny

from fcn.data.images import read_mask
from fcn.data.synthetic import make_example
from fcn.evaluate import main
from fcn.inference import load
from fcn.metrics import host_confusion_matrix

CLASSES = ["background", "circle", "square", "triangle"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory)


def folder_run(workdir, tmp_path, sizes, max_size: int) -> tuple[str, list]:
    """A copy of the tiny run whose data is a folder of synthetic examples of `sizes` (val and train alike),
    read with data.max_size; and the val (image, mask) paths."""
    pairs = []
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (tmp_path / "data" / split / sub).mkdir(parents=True)
        for i, size in enumerate(sizes):
            image, label = make_example(11, i, size)
            paths = tmp_path / "data" / split / "images" / f"{i}.png", tmp_path / "data" / split / "masks" / f"{i}.png"
            Image.fromarray(image).save(paths[0])
            Image.fromarray(label).save(paths[1])
            pairs.append(paths)
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    config = json.loads((run / "config.json").read_text())
    config["data"].update(source="folder", path=str(tmp_path / "data"), class_names=CLASSES, max_size=max_size)
    (run / "config.json").write_text(json.dumps(config))
    return str(run), pairs[len(sizes) :]


def test_max_size_evaluation_scores_the_predictor_output_at_the_labels_size(workdir, tmp_path):
    """Evaluation shrank labels with data.max_size and scored at the shrunk size: its scores were not those of
    what `fcn.load(...).predict` returns (a class map at the image's size). Images over max_size, of several
    sizes, batched with one under it: the confusion matrix is that of predict's output against the files."""
    sizes = [(48, 64), (50, 62), (60, 40), (24, 30), (47, 63)]
    run, val = folder_run(workdir, tmp_path, sizes, max_size=32)
    assert main(["--workdir", run, "--examples", "5"]) == 0
    rep = json.loads((tmp_path / "run" / "eval_val.json").read_text())

    seg = load(run)
    assert seg.max_size == 32
    expected, labelled = np.zeros((4, 4), np.int64), 0
    for image_path, mask_path in val:
        label = read_mask(mask_path, num_classes=4)
        pred = seg.predict(image_path)
        assert pred.shape == label.shape
        expected += host_confusion_matrix(label, pred, 4)
        labelled += int(np.sum(label != 255))
    got = np.asarray(rep["confusion_matrix"])
    assert rep["num_pixels"] == labelled == sum(h * w for h, w in sizes)  # every pixel of the files, once
    # Equal, not close: the network's input is shrunk alike (fcn.data.images.fit_image), its logits scaled
    # back alike (fcn.inference.resize_channels); a near tie in this 6-step model's logits moved pixels before.
    np.testing.assert_array_equal(got, expected)
    assert (tmp_path / "run" / "eval_val_examples.png").exists()


def test_without_max_size_the_batches_are_those_of_the_files():
    """Only images that max_size shrank are batched apart: the others as before, labels and all."""
    from fcn.data.base import Split
    from fcn.data.pipeline import eval_batches

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(8, 8), (7, 8), (8, 8)]]
    labels = [np.full(im.shape[:2], i, np.uint8) for i, im in enumerate(images)]
    labels[2] = np.zeros((16, 16), np.uint8)  # the file's label: its image was shrunk to 8 x 8
    batches = list(eval_batches(Split(images, labels, ["a", "b", "c"]), 2, 8, 255))
    assert [b[2] for b in batches] == [[0, 1], [2]]
    assert [b[3] for b in batches] == [[(8, 8), (7, 8)], [(8, 8)]]
    np.testing.assert_array_equal(batches[0][1][1, :7], 1)
    assert (batches[0][1][1, 7] == 255).all() and (batches[1][1] == 255).all()


def test_two_processes_score_what_one_does(workdir, tmp_path):
    """With two processes, each scales up and scores its own rows of a batch of shrunk images, and the
    matrices are summed once across them: the same matrix as one process's, with every file's pixel once."""
    from test_distributed import ROOT, _env, _free_port

    run, _ = folder_run(workdir, tmp_path, [(48, 64), (50, 62), (60, 40), (24, 30), (47, 63)], max_size=32)
    command = [sys.executable, "-m", "fcn.evaluate", "--workdir", run, "--examples", "0"]
    env = _env(tmp_path / "jax_cache")  # both runs with XLA's convolutions: oneDNN's serve one process only
    one = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    alone = json.loads((tmp_path / "run" / "eval_val.json").read_text())
    (tmp_path / "run" / "eval_val.json").unlink()
    launch = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
    procs = [
        subprocess.Popen(
            [*command, *launch, "--process_id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    both = json.loads((tmp_path / "run" / "eval_val.json").read_text())
    assert both["confusion_matrix"] == alone["confusion_matrix"]
    assert both["num_pixels"] == alone["num_pixels"] == 48 * 64 + 50 * 62 + 60 * 40 + 24 * 30 + 47 * 63
