"""fcn: semantic segmentation with fully convolutional networks in JAX/Flax.

import fcn
model = fcn.UNet(num_classes=11, rngs=flax.nnx.Rngs(0))
logits_BHWK = model(images_BHWC)            # any H, W
probs_BHWK = fcn.predict_proba(model, images_BHWC)
print(fcn.summary(model, (1, 360, 480, 3)))
"""

from pathlib import Path as _Path


def _source_files() -> list:
    """[path, size, modification time] of each of fcn's source files (its .py files, and the .cc and .h
    of the oneDNN handlers), in order; a file gone as it is listed, [path]."""
    out = []
    for p in sorted(p for suffix in ("py", "cc", "h") for p in _Path(__file__).parent.rglob(f"*.{suffix}")):
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p)])
    return out


# Before any of fcn's modules is imported. fcn.traced keys the programs it keeps by these files'
# contents, which describe the code in this process only while the files are as they were here.
_imported_source = _source_files()

from fcn import losses, metrics  # noqa: E402
from fcn.inference import Segmenter, load  # noqa: E402
from fcn.model import UNet, predict_proba  # noqa: E402
from fcn.summary import summary  # noqa: E402

__all__ = ["Segmenter", "UNet", "load", "load_exported", "losses", "metrics", "predict_proba", "summary"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # fcn.load_exported on first use: imported here eagerly, fcn.export was already in sys.modules
    # when `python -m fcn.export` ran it, and Python warned about that on every export.
    if name == "load_exported":
        from fcn.exported import load_exported

        return load_exported
    raise AttributeError(f"module 'fcn' has no attribute {name!r}")


def __dir__() -> list[str]:
    # load_exported too, which only __getattr__ knows: a notebook's tab completion lists it
    return sorted(set(globals()) | set(__all__))
