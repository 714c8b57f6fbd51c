"""notebooks/quickstart.ipynb runs top to bottom, so it cannot rot."""

import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []))


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.delenv("FCN_QUICKSTART_WORKDIR", raising=False)  # always train from scratch
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's workdir lands in pytest's tmp
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Its 200 training steps are for its reader; 20 (past the warmup's 10) take every path of every cell,
    # the final evaluation and checkpoint included, in a fraction of the time. The notebook file is untouched.
    train = next(c for c in nb.cells if "train_and_evaluate(config, workdir)" in c.source)
    train.source, found = re.subn(r"^config\.num_steps = \d+$", "config.num_steps = 20", train.source, flags=re.M)
    assert found == 1, train.source
    # kernel "python3" is ipykernel in this interpreter (jupyter_client runs it with sys.executable).
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert f"python: {sys.executable}" in outputs
    assert "mean IoU" in outputs and "tiled vs whole" in outputs
    stderr = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr")
    assert "Warning" not in stderr, stderr  # was tqdm.auto's "IProgress not found", without ipywidgets
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "the predictions are shown as pictures"


def test_quickstart_loads_the_workdir_its_text_names_instead_of_training(tmp_path, monkeypatch):
    """The notebook's text: train with `python train.py ... --workdir runs/shapes` (from the repository
    root) and point FCN_QUICKSTART_WORKDIR at that workdir. Its kernel runs in notebooks/, where that
    relative path named nothing: the notebook trained a model of its own there instead of loading."""
    from configs import tiny
    from fcn.train import train_and_evaluate

    run = tmp_path / "run"
    train_and_evaluate(tiny.get_config(), run)
    monkeypatch.setenv("FCN_QUICKSTART_WORKDIR", os.path.relpath(run, NOTEBOOK.parents[1]))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:7]  # up to the predictions: loading is what is checked
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()
    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert f"workdir: {run}" in outputs and "mean IoU" not in outputs  # loaded, not trained


def test_every_public_name_is_listed_and_importable():
    """fcn.load_exported (imported on first use) was missing from dir(fcn), so from tab completion."""
    import fcn

    assert set(fcn.__all__) <= set(dir(fcn))
    assert all(callable(getattr(fcn, name)) or name in ("losses", "metrics") for name in fcn.__all__)


def test_a_figure_drawn_before_pyplot_is_imported_shows_in_the_notebook():
    """viz.plot_examples switched matplotlib to Agg whenever pyplot was not imported yet, to draw no window
    from a script; in a Jupyter kernel that replaced the inline backend: the figure, and every later one of
    the session, showed as "<Figure size ...>" text, never as a picture."""
    cells = [
        "import numpy as np\nfrom fcn import viz\n"
        "fig = viz.plot_examples([(np.zeros((8, 10, 3), np.uint8), None, np.ones((8, 10), np.uint8))], "
        "['a', 'b'], np.array([[0, 0, 0], [255, 0, 0]], np.uint8))",
        "import matplotlib.pyplot as plt\nplt.plot([0, 1]); plt.show()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}
    )
    client.execute()
    for cell in nb.cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), (cell.source, cell.outputs)
