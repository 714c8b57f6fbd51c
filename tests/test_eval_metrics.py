"""What `python -m fcn.evaluate` and training's evaluation count: data that fits the model, each labelled pixel once."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval_resolution import folder_run
from test_inference import train_tiny

from fcn.evaluate import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return train_tiny(tmp_path_factory)


def test_data_with_another_number_of_classes_than_the_model_is_refused(workdir, tmp_path, capsys):
    """`--config.data.class_names` with a fifth class on a 4-class model: the masks' class-4 pixels passed the
    data's check (5 classes) and then counted nowhere in the model's 4 x 4 matrix, so the scores silently
    left out a quarter of the pixels. Now one line names the key and both class lists; nothing is written."""
    run, val = folder_run(workdir, tmp_path, [(24, 32), (24, 32)], max_size=0)
    mask = np.asarray(Image.open(val[0][1])).copy()
    mask[:, :8] = 4
    Image.fromarray(mask).save(val[0][1])
    (tmp_path / "run" / "eval_val.json").write_text('{"kept": true}')
    five = '--config.data.class_names=("background", "circle", "square", "triangle", "star")'
    assert main(["--workdir", run, "--examples", "0", five]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "data.class_names: the data (folder) has 5 classes (background, circle, square, triangle, star)" in err
    assert "trained on 4 (background, circle, square, triangle)" in err
    assert (tmp_path / "run" / "eval_val.json").read_text() == '{"kept": true}'


def numpy_confusion(labels, preds, k, ignore=255):
    """Rows ground truth, columns prediction; ignored pixels nowhere."""
    cm = np.zeros((k, k), np.int64)
    keep = labels != ignore
    np.add.at(cm, (labels[keep].astype(np.int64), preds[keep].astype(np.int64)), 1)
    return cm


@pytest.mark.parametrize("variant", ["plain", "input_scale=0.5", "eval_hflip"])
def test_evaluation_counts_each_labelled_pixel_once_as_each_image_alone_predicts_it(variant):
    """evaluate_split's matrix (as train.py's evaluation and fcn.evaluate take it) against numpy on the model's
    predictions for each image alone: images of three sizes padded to shared ones, a short last batch filled
    with padded rows, ignored pixels; with flip test-time augmentation and with a model that resizes its input."""
    import jax
    import jax.numpy as jnp

    from configs import tiny
    from fcn import evaluate, sharding, state as state_lib
    from fcn.data.base import Split

    config = tiny.get_config()
    config.model.depth = 3  # 21 x 30 and 19 x 27 share a padded size, 24 x 32
    config.model.input_scale = 0.5 if variant == "input_scale=0.5" else 1.0
    config.eval_hflip = variant == "eval_hflip"
    config.eval_batch_size = 2
    rng = np.random.default_rng(1)
    sizes = [(21, 30), (19, 27), (21, 30), (16, 20), (19, 27)]
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
    labels = [rng.integers(0, 4, s).astype(np.uint8) for s in sizes]
    for label in labels:
        label[rng.random(label.shape) < 0.25] = 255
    split = Split(images, labels, [str(i) for i in range(len(sizes))])
    graphs, state, _ = state_lib.create(config, 4)
    step = jax.jit(state_lib.make_eval_step(graphs, 4, 255, hflip=config.eval_hflip))
    cm, _ = evaluate.evaluate_split(step, state, split, config, 4, sharding.make_mesh())

    model = state_lib.eval_model(graphs, state)
    expected = np.zeros((4, 4), np.int64)
    for image, label in zip(images, labels):
        x = jnp.asarray(image[None]) / 255.0
        logits = model(x) + (model(x[:, :, ::-1])[:, :, ::-1] if config.eval_hflip else 0)
        expected += numpy_confusion(label, np.asarray(jnp.argmax(logits, -1))[0], 4)
    assert cm.dtype == np.int64 and cm.sum() == sum(int((label != 255).sum()) for label in labels)
    np.testing.assert_array_equal(cm, expected)


def test_a_data_setting_the_workdirs_source_never_reads_is_refused(workdir, capsys):
    """`--config.data.class_names` on a workdir of a source that never reads it (here synthetic; CamVid alike):
    the evaluation ran and scored the source's own classes, saying nothing. Now one line names the key, its
    value and the source, before anything is read or written."""
    report = Path(workdir) / "eval_val.json"
    before = report.read_bytes() if report.exists() else None
    assert main(["--workdir", workdir, "--examples", "0", '--config.data.class_names=("a","b")']) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "config.data.class_names=('a', 'b') is read only by data.source='folder' or 'tfds'" in err
    assert "this config's source is 'synthetic'" in err
    assert (report.read_bytes() if report.exists() else None) == before
