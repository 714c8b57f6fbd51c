"""metrics.jsonl and TensorBoard events across a stop and a resume (fcn/metrics_log.py)."""

import importlib.util
import json
import struct

import pytest

from fcn.metrics_log import MetricsLog, _summary_writer_class

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")


def _events(workdir):
    """Every event of every events file: (file, Event), in file order."""
    _summary_writer_class()  # tensorboardX imported with torch kept out, as the training does
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):  # TFRecord framing: length, its crc, the Event, its crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            out.append((path.name, event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])))
            pos += 12 + n + 4
    return out


def test_a_resumed_log_hides_the_stopped_runs_later_steps_and_names_eval_tags_once(tmp_path):
    """A run logs steps 1..5 and an evaluation at 4, then is killed; resumed from checkpoint 3, it
    logs 4 and 5 again. metrics.jsonl keeps each step once, and the resumed events file starts
    by telling TensorBoard to hide the first run's events from step 4 on (a SessionLog START at 4),
    so no step shows twice. Evaluation scalars are tagged eval/mean_iou (not eval/eval_mean_iou)."""
    first = MetricsLog(tmp_path, 0)
    for step in range(1, 6):
        first.write(step, {"loss": 1.0 / step})
    first.write(4, {"eval_mean_iou": 0.25}, "eval")
    first.close()

    resumed = MetricsLog(tmp_path, 3)
    for step in (4, 5):
        resumed.write(step, {"loss": 0.5 / step})
    resumed.close()

    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.125), (5, 0.1)]

    events = _events(tmp_path)
    files = sorted({name for name, _ in events})
    assert len(files) == 2, files
    tags = {(v.tag, e.step) for _, e in events for v in e.summary.value}
    assert ("eval/mean_iou", 4) in tags and not any("eval_" in tag for tag, _ in tags)
    assert _purges(events, files[1]) == [4]
    assert _purges(events, files[0]) == []


def test_a_run_restarted_before_its_first_checkpoint_hides_the_dead_runs_events(tmp_path):
    """A run logs steps 1..3 and dies before its first checkpoint; the same command starts again
    from step 0. metrics.jsonl dropped the dead run's lines, but TensorBoard was told nothing: it
    showed steps 1 and 2 twice and the dead run's step 3 as if it were this run's."""
    first = MetricsLog(tmp_path, 0)
    for step in (1, 2, 3):
        first.write(step, {"loss": 1.0 / step})
    first.close()

    again = MetricsLog(tmp_path, 0)
    for step in (1, 2):
        again.write(step, {"loss": 0.5 / step})
    again.close()

    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 0.5), (2, 0.25)]
    events = _events(tmp_path)
    files = sorted({name for name, _ in events})
    assert len(files) == 2, files
    assert _purges(events, files[1]) == [1]


def _purges(events, file):
    """The steps from which `file`'s events tell TensorBoard to hide earlier ones (SessionLog START)."""
    mine = [e for name, e in events if name == file and e.HasField("session_log")]
    return [e.step for e in mine if e.session_log.status == e.session_log.START]


def test_an_evaluation_that_scored_nothing_is_recorded_as_null(tmp_path):
    """An eval split whose pixels are all ignore_label has no mean IoU (the report's None). The line was
    written without it, so evaluated_at did not see the evaluation and a finished workdir evaluated its
    last step again at every re-run of its command (fcn.train's final_eval)."""
    from fcn.metrics_log import evaluated_at

    log = MetricsLog(tmp_path, 0)
    log.write(2, {"eval_mean_iou": None, "eval_pixel_accuracy": None, "eval_fw_iou": 0.0}, "eval")
    log.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row == {"step": 2, "eval_mean_iou": None, "eval_pixel_accuracy": None, "eval_fw_iou": 0.0}
    assert evaluated_at(tmp_path, 2) and not evaluated_at(tmp_path, 1)
    tags = {v.tag for _, e in _events(tmp_path) for v in e.summary.value}
    assert tags == {"eval/fw_iou"}  # TensorBoard: no scalar for None
