"""fcn: semantic segmentation with fully convolutional networks in JAX/Flax.

import fcn
model = fcn.UNet(num_classes=11, rngs=flax.nnx.Rngs(0))
logits_BHWK = model(images_BHWC)            # any H, W
probs_BHWK = fcn.predict_proba(model, images_BHWC)
print(fcn.summary(model, (1, 360, 480, 3)))
"""

# First, before any other of fcn's modules: the source files as this process imports them (fcn.traced).
from fcn import sources  # noqa: F401

# isort: split
from fcn import losses, metrics
from fcn.inference import Segmenter, load
from fcn.model import UNet, predict_proba
from fcn.summary import summary

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
