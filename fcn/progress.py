"""fcn's progress bars: which tqdm class they use, and lines written above them.

Every bar in fcn (training, loading images, predicting, downloading) takes its class from
`tqdm_class()`. The training bar shows in process 0 wherever it runs. The others are made with
`disable=None`: the text bar then shows only on a terminal, as tqdm decides it (silent in a log
file, and in a Jupyter kernel without ipywidgets, whose streams are no terminal), while in a kernel
with ipywidgets tqdm's widget shows them, as `tqdm.auto`'s did for the training bar before.
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
