"""Evaluation's progress bar (fcn.evaluate.evaluate_split): in a log, alone and during training."""

import io
import re

import jax
import pytest

from configs import tiny
from fcn import evaluate, sharding, state as state_lib
from fcn.data import get_source
from fcn.progress import progress_bar
from tests.test_train import tiny_eval_case


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def _prints(text: str) -> list[str]:
    """A bar's prints in a log: each begins with "\\r"; lines end with "\\n"."""
    return [p.strip() for p in re.split(r"[\r\n]", text) if p.strip()]


@pytest.mark.parametrize("in_flight", [1, 2])
def test_a_long_evaluation_shows_a_bar_over_images_in_a_log(capsys, monkeypatch, in_flight):
    """evaluate_split ran batch after batch with nothing on stderr: minutes in silence on a CPU (CamVid val at
    full resolution, configs/camvid.py in float32: 68 s on 2 cores). Its bar counts images, not the
    rows that fill a short batch."""
    monkeypatch.setattr(evaluate, "_PROGRESS_AFTER_S", 0, raising=False)  # as if it ran long
    step, state, split, config, num_classes = tiny_eval_case()  # 7 images: 4 batches of 2, the last one short
    capsys.readouterr()
    evaluate.evaluate_split(
        step, state, split, config, num_classes, sharding.make_mesh(), in_flight=in_flight, desc="evaluate val"
    )
    err = capsys.readouterr().err
    prints = _prints(err)
    assert prints[0].startswith("evaluate val:   0%") and " 0/7 " in prints[0], err
    assert prints[-1].startswith("evaluate val: 100%") and " 7/7 " in prints[-1] and "image/s" in prints[-1], err
    assert err.endswith("\n") and len(prints) == 2, err  # a log gets the start and the end, not a line per batch


def test_a_short_evaluation_shows_no_bar(capsys):
    """The bar appears only after evaluate._PROGRESS_AFTER_S: CamVid val with configs/camvid_cpu.py takes 3 s."""
    config = tiny.get_config()
    source = get_source(config.data)
    graphs, state, _ = state_lib.create(config, source.num_classes)
    step = jax.jit(state_lib.make_eval_step(graphs, source.num_classes, source.ignore_label))
    capsys.readouterr()
    evaluate.evaluate_split(step, state, source.load("val"), config, source.num_classes, sharding.make_mesh())
    assert capsys.readouterr().err == ""


def test_a_bar_opened_below_another_in_a_log_prints_lines_of_its_own():
    """Below an open bar tqdm places a second one by cursor moves: a log file kept "\\x1b[A" after each of its
    prints, and a bar at the same place would share (after a "\\r") the first bar's last line."""
    log = _Log()
    outer = progress_bar(total=4, file=log, unit="step")
    outer.update(1)
    with progress_bar(total=3, file=log, desc="evaluate val", unit="image", leave=False) as inner:
        inner.update(3)
    outer.update(3)
    outer.close()
    text = log.getvalue()
    assert "\x1b" not in text, repr(text)
    lines = text.split("\n")
    assert [i for i, line in enumerate(lines) if "evaluate val" in line] == [1], repr(text)
    assert _prints(lines[1]) == [p for p in _prints(lines[1]) if p.startswith("evaluate val:")], repr(text)
    assert " 3/3 " in lines[1] and " 0/4 " in lines[0] and " 4/4 " in lines[2], repr(text)  # nothing lost


def test_periodic_evaluation_in_a_log_is_apart_from_the_training_bar(tmp_path, capsys, monkeypatch):
    """During training's evaluations the training bar is open: the evaluation's lines come on lines of their
    own, with no cursor moves, each ending with the images evaluated."""
    from fcn.train import train_and_evaluate

    monkeypatch.setattr(evaluate, "_PROGRESS_AFTER_S", 0, raising=False)
    config = tiny.get_config()  # evaluates at steps 3 and 6
    train_and_evaluate(config, tmp_path / "run")
    err = capsys.readouterr().err
    assert "\x1b" not in err, repr(err)
    evals = [line for line in err.split("\n") if "evaluate val" in line]
    assert len(evals) == 2, repr(err)
    for line in evals:
        prints = _prints(line)
        assert all(p.startswith("evaluate val:") for p in prints), repr(line)  # no training bar in it
        assert " 5/5 " in prints[-1], repr(line)
    assert any("6/6" in line and "step/s" in line for line in err.split("\n")), repr(err)  # the training bar's end
