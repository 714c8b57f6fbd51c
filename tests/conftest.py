"""One fcn cache folder and one persistent compilation cache for the whole test session.

Nothing is read from or written to ~/.cache/fcn. A program one test compiles (in
this process or in a training process it starts, which inherits the environment)
is read back by the next test that needs it, rather than compiled again. Under
pytest-xdist the workers share both folders; jax's cache and fcn's are written
atomically, so concurrent writers are safe.
"""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _fcn_cache_dir(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCN_CACHE_DIR", str(root / "fcn_cache"))
        mp.setenv("FCN_JAX_CACHE", str(root / "jax_cache"))
        from fcn.traced import enable_compilation_cache

        enable_compilation_cache()
        yield
