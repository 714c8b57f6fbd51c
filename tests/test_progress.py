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
