"""fcn.progress: the tqdm class every fcn progress bar uses."""

import subprocess
import sys
import textwrap
from pathlib import Path

import tqdm.std

from fcn.progress import tqdm_class

# A Jupyter kernel without ipywidgets, as tqdm.autonotebook detects one, then what fcn.train does.
_IN_A_KERNEL = """
import sys, types
sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")
import IPython
IPython.get_ipython = lambda: type("ZMQInteractiveShell", (), {})()
sys.modules["ipywidgets"] = None  # not installed

import tqdm.std
import fcn.train
from fcn.progress import logging_redirect, tqdm_class

assert tqdm_class() is tqdm.std.tqdm, tqdm_class()
with tqdm_class()(total=2, disable=True) as bar, logging_redirect(bar):
    bar.update(2)
print("done")
"""


def test_a_kernel_without_ipywidgets_gets_the_text_bar_and_no_warning():
    """In a Jupyter kernel without ipywidgets (no dependency of fcn), `import fcn.train` printed
    "TqdmWarning: IProgress not found. Please update jupyter and ipywidgets" into the cell, from its
    tqdm.auto and tqdm.contrib.logging imports; the bar was the text bar all the same."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-W", "default", "-c", textwrap.dedent(_IN_A_KERNEL)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout == "done\n", run.stderr
    assert "Warning" not in run.stderr, run.stderr


def test_outside_a_kernel_the_text_bar(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel.zmqshell", raising=False)
    assert tqdm_class() is tqdm.std.tqdm


class _KernelStream:
    """A stream as a Jupyter kernel has them: what is written reaches the cell when flushed."""

    def __init__(self, name: str, cell: list):
        self.name, self.cell, self.pending = name, cell, ""

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.cell.append((self.name, self.pending))
            self.pending = ""

    def isatty(self) -> bool:
        return False


def _shown(cell: list) -> list[str]:
    """The cell's lines as a notebook shows them: one block per run of a stream, "\\r" returns to the line's start."""
    blocks = []
    for name, text in cell:
        if blocks and blocks[-1][0] == name:
            blocks[-1][1] += text
        else:
            blocks.append([name, text])
    return [line.rsplit("\r", 1)[-1] for _, text in blocks for line in text.split("\n") if line.strip("\r ")]


def test_in_a_notebook_the_evaluation_line_prints_above_the_training_bar(tmp_path, monkeypatch):
    """The line after an evaluation went to stdout unflushed, and the bar (stderr) was drawn again at
    once: a kernel sends each stream when flushed, so the line reached the cell below the bar, and
    with stdout's periodic flush in between the cell showed the bar twice, above the line and below."""
    from configs import tiny
    from fcn.train import train_and_evaluate

    cell = []
    monkeypatch.setattr(sys, "stdout", _KernelStream("stdout", cell))
    monkeypatch.setattr(sys, "stderr", _KernelStream("stderr", cell))
    config = tiny.get_config()
    config.num_steps, config.optimizer.warmup_steps = 2, 0
    train_and_evaluate(config, tmp_path / "run")
    sys.stdout.flush(), sys.stderr.flush()  # the cell ends
    lines = _shown(cell)
    bars = [i for i, line in enumerate(lines) if "2/2 [" in line]
    evaluated = [i for i, line in enumerate(lines) if line.startswith("step 2: val mean IoU")]
    assert len(bars) == 1 and len(evaluated) == 1 and evaluated[0] < bars[0], lines


def test_in_a_log_file_decoding_says_what_it_does_and_how_long_it_took(capsys):
    """The loading, predicting and download bars were made with disable=None, "only on a terminal": a
    job's log (stderr a file) said nothing while a split was decoded, nor that it was. Now a log gets
    the bar when it starts, every 30 s at most, and at its end, with the count and the rate."""
    from fcn.data.base import Examples, map_examples

    examples = Examples(names=[str(i) for i in range(150)], read_fn=lambda i: i, size_fn=lambda i: (1, 1))
    done = map_examples(lambda i: i * 2, examples, workers=2, desc="decoding camvid train")
    assert [v for _, v in done] == [2 * i for i in range(150)]
    err = capsys.readouterr().err
    assert "decoding camvid train:   0%" in err and "150/150 [" in err, err
    assert err.count("\r") <= 3 and "\x1b" not in err, repr(err)  # start, end: no line per update, no ANSI codes


def test_a_bar_in_a_log_file_prints_at_most_every_30_s(monkeypatch):
    import io

    from fcn.progress import LOG_EVERY_S, progress_bar

    log = io.StringIO()  # no terminal
    with progress_bar(total=1000, file=log, desc="x") as bar:
        # maxinterval too: tqdm's monitor thread (every 10 s by default) printed between the 30 s lines
        assert bar.mininterval == bar.maxinterval == LOG_EVERY_S == 30
        for _ in range(1000):
            bar.update(1)
    assert log.getvalue().count("\r") <= 3, repr(log.getvalue())
    tty = io.StringIO()
    tty.isatty = lambda: True
    with progress_bar(total=1, file=tty) as bar:
        assert bar.mininterval == 0.1  # tqdm's own on a terminal
