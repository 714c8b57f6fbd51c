"""What `python -m fcn.evaluate` and training's evaluation count: data that fits the model, each labelled pixel once."""

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
