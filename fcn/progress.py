"""fcn's progress bars: which tqdm class they use, and lines written above them.

Every bar in fcn (training, loading images, evaluating, predicting, downloading) is made by
`progress_bar()`, of the class `tqdm_class()` gives. On a terminal it is redrawn as tqdm does (every
0.1 s at most); where its stream is no terminal (a log file, a CI or cluster job's piped output, a
Jupyter kernel without ipywidgets) it prints when it starts, every 30 s, and at its end: long work
shows its progress, rate and time left in a log too, without a line per update. In a kernel with
ipywidgets tqdm's widget shows them.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings


def tqdm_class() -> type:
    """tqdm.notebook's widget in a Jupyter kernel where ipywidgets is installed, else tqdm's text bar.

    `tqdm.auto` made the same choice but, in a kernel without ipywidgets, first printed a TqdmWarning
    into the cell ("IProgress not found. Please update jupyter and ipywidgets"): ipywidgets is no
    dependency of fcn, and the text bar it fell back to is the one given here without the warning.
    """
    if "ipykernel.zmqshell" in sys.modules and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.std import TqdmExperimentalWarning

        with warnings.catch_warnings():  # "Using tqdm.autonotebook.tqdm in notebook mode", as tqdm.auto hides it
            warnings.simplefilter("ignore", TqdmExperimentalWarning)
            from tqdm.autonotebook import tqdm  # the widget; the text bar in a Qt console or Spyder
        return tqdm
    from tqdm.std import tqdm

    return tqdm


LOG_EVERY_S = 30  # where a bar's stream is no terminal: a line every 30 s at most, not one per update


def progress_bar(*, disable: bool = False, **kwargs):
    """A progress bar of `tqdm_class()` with tqdm's keyword arguments, shown on a terminal and elsewhere.

    Where its stream (`file`, stderr by default) is no terminal, it prints a line at most every
    LOG_EVERY_S. fcn's bars other than training's were made with disable=None, which tqdm reads as
    "only on a terminal": a job's log then said nothing while 10,000 images were predicted or decoded
    or a dataset downloaded, for minutes, and no line said what was under way.
    """
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        # maxinterval too: else tqdm's monitor thread printed every 10 s after the first line.
        # A log keeps every line, so leave=False would only drop the closing one; and tqdm's
        # positions below another bar are cursor moves ("\x1b[A") that a log keeps as they are.
        kwargs = {"mininterval": LOG_EVERY_S, "maxinterval": LOG_EVERY_S, **kwargs, "leave": True, "position": 0}
        if not disable and any(b.fp == stream and not b.disable for b in list(getattr(tqdm_class(), "_instances", ()))):
            kwargs["file"] = _OwnLine(stream)  # opened while another bar's line is open there (evaluation in training)
    return tqdm_class()(disable=disable, **kwargs)


class _OwnLine:
    """A log stream for a bar opened while another bar's line is still open in it: the bar's first
    line starts a new line, instead of sharing (after a "\\r") the line of the other bar's last print."""

    def __init__(self, stream):
        self._stream, self._started = stream, False

    def write(self, text: str):
        if text and not self._started:
            self._started, text = True, "\n" + text
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, isatty, encoding, ...
        return getattr(self._stream, name)

    def __eq__(self, other):  # tqdm.write(file=stream) clears the bars written to stream: this one too
        return self._stream == getattr(other, "_stream", other)

    def __hash__(self):
        return hash(self._stream)


def logging_redirect(bar):
    """tqdm's logging_redirect_tqdm for `bar`'s class: inside it, log lines print above the bar, not into it.

    tqdm.contrib imports tqdm.auto, which chooses its class on import: in a Jupyter kernel without
    ipywidgets that printed the same "IProgress not found" warning into the cell, for a class fcn does
    not use.
    """
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "IProgress not found", TqdmWarning)
        from tqdm.contrib.logging import logging_redirect_tqdm
    return logging_redirect_tqdm(tqdm_class=type(bar))


def write(bar, text: str) -> None:
    """Print `text` on stdout above `bar`, as bar.write does, but flushed before the bar is drawn again.

    A Jupyter kernel sends stdout and stderr (the bar's) to the cell apart, each when flushed: the
    unflushed line reached the cell after the redrawn bar, which then showed twice, above it and below.
    """
    with bar.external_write_mode():  # clears the bar, and draws it again on leaving
        print(text, flush=True)


def restart_clock(bar) -> None:
    """Restart a progress bar's clock, keeping its count: its rate and time left are then the steps'
    alone. Without this, the first step's compilation (minutes on a GPU) stood in the rate for the
    rest of a run written to a log file: "177.51s/step", 295 hours left, for a run of 5 minutes."""
    n = bar.n
    bar.refresh = lambda *args, **kwargs: None  # reset() would print the bar at 0 first
    try:
        bar.reset(total=bar.total)  # the clock, the rate's moving averages, and the count
    finally:
        del bar.refresh  # tqdm's own again
    bar.initial = bar.n = bar.last_print_n = n
    bar.refresh()
