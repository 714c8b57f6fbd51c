"""fcn.UNet used directly from Python, as a notebook would: bad arguments and inputs named, at once."""

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fcn.model import UNet


def tiny(**kw):
    kw = {"features": 4, "depth": 2, **kw}
    return UNet(3, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize(
    "kw, named",
    [
        ({"in_channels": 0}, "model.in_channels=0"),  # ZeroDivisionError in input_stats
        ({"in_channels": -1}, "model.in_channels=-1"),  # jax's 'non-negative indices' about a kernel shape
        ({"features": 4.5}, "model.features=4.5"),  # jax's 'Shapes must be ... integer type'
        ({"depth": 2.0}, "model.depth=2.0"),  # "'float' object cannot be interpreted as an integer"
        ({"bottleneck": -1}, "model.bottleneck=-1"),  # accepted: each 1x1 conv reduced to one channel
        ({"dropout": 1.5}, "model.dropout=1.5"),  # accepted: every activation dropped
        ({"dropout": -0.1}, "model.dropout=-0.1"),  # accepted: activations scaled by 1 / 1.1
        ({"dtype": "foo"}, "model.dtype='foo'"),  # accepted; 'data type not understood' at the first call
        ({"dtype": jnp.int32}, "model.dtype="),  # flax's 'Dtype must be inexact', naming no argument
    ],
)
def test_a_bad_constructor_argument_is_named(kw, named):
    """UNet(...) from Python (a notebook) checked only some of its arguments: the others failed later,
    deep inside jax or flax, or built a network that silently did something else."""
    with pytest.raises(ValueError, match=re.escape(named)):
        tiny(**kw)


def test_a_fractional_class_count_is_named():
    with pytest.raises(ValueError, match=re.escape("num_classes=2.5")):  # was jax's 'Shapes must be ...'
        UNet(2.5, features=4, depth=2, rngs=nnx.Rngs(0))


def test_a_dtype_given_as_a_string_and_numpy_integers_are_accepted():
    model = tiny(dtype="bfloat16", features=np.int64(4), depth=np.int32(1))
    model.eval()
    assert model(jnp.full((1, 5, 7, 3), 0.5)).dtype == jnp.float32
