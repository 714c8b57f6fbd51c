"""How the predictors read images (fcn/inputs.py), beyond tests/test_inference.py's cases."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fcn.data.images import DataError
from fcn.inference import Segmenter
from fcn.model import UNet


def test_bfloat16_images_are_floats_as_the_model_takes_them():
    """A bfloat16 image (jax's, or numpy's through ml_dtypes) was refused as "dtype bfloat16; expected uint8,
    integers in 0..255, or floats in [0, 1]": numpy does not count it a float, though the model takes it."""
    seg = Segmenter(UNet(3, features=4, depth=2, rngs=nnx.Rngs(0)))
    image = np.random.default_rng(0).random((9, 11, 3)).astype(ml_dtypes.bfloat16)
    expected = seg.predict_proba(image.astype(np.float32))
    for bf16 in (image, jnp.asarray(image), [image]):
        got = seg.predict_proba(bf16)
        np.testing.assert_array_equal(got[0] if isinstance(got, list) else got, expected)
    with pytest.raises(DataError, match=r"float values in \[.*\]; float images must be in \[0, 1\]"):
        seg.predict(image * 255)
