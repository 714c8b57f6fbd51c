"""Every test session gets its own fcn cache folder: nothing read from or written to ~/.cache/fcn."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _fcn_cache_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCN_CACHE_DIR", str(tmp_path_factory.mktemp("fcn_cache")))
        yield
