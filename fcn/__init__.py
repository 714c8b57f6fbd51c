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
import importlib
import sys
import types

from fcn import losses, metrics

__all__ = ["Segmenter", "UNet", "load", "load_exported", "losses", "metrics", "predict_proba", "summary"]
__version__ = "0.1.0"

# The model's names (flax, optax) on first use, so that `import fcn.exported` runs an artifact with jax and
# numpy alone; so are the submodules their imports made attributes of fcn (`import fcn; fcn.ops`).
# fcn.load_exported: imported eagerly, fcn.export was already in sys.modules when `python -m fcn.export`
# ran it, and Python warned about that on every export.
_LAZY = {
    "Segmenter": "fcn.inference",
    "load": "fcn.inference",
    "UNet": "fcn.model",
    "predict_proba": "fcn.model",
    "summary": "fcn.summary",
    "load_exported": "fcn.exported",
}
_SUBMODULES = {"canvas", "data", "inference", "layers", "model", "norm", "onednn", "onednn_build", "ops", "resize"}


def __getattr__(name: str):
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    if name in _SUBMODULES:  # also `from fcn import ops` in fcn's own modules, before fcn.ops is imported
        return importlib.import_module(f"fcn.{name}")  # which makes it fcn's attribute, as it was
    raise AttributeError(f"module 'fcn' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names too, which only __getattr__ knows: a notebook's tab completion lists them
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule fcn.summary sets fcn.summary to it: fcn.summary stays the function.
        if name == "summary" and isinstance(value, types.ModuleType):
            value = value.summary
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
