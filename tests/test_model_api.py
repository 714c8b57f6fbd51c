"""fcn.UNet used directly from Python, as a notebook would: bad arguments and inputs named, at once."""

import re

import jax
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


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_integer_images_are_refused_not_taken_as_floats(dtype):
    """A uint8 image went in as floats in 0..255 instead of [0, 1]: logits of about +-100, silently
    (fcn.load(...).predict divides uint8 by 255; the model itself takes floats only)."""
    model = tiny()
    model.eval()
    images = np.zeros((1, 8, 8, 3), dtype)
    with pytest.raises(ValueError, match=f"float images in \\[0, 1\\], got {np.dtype(dtype)} images \\(1, 8, 8, 3\\)"):
        model(images)
    with pytest.raises(ValueError, match="float images"):
        model(jnp.asarray(images))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, jnp.bfloat16])
def test_float_images_of_any_precision_give_the_float32_logits(dtype):
    model = tiny()
    model.eval()
    x = np.random.default_rng(0).random((2, 12, 12, 3)).astype(np.float32)
    want = np.asarray(model(x))
    got = np.asarray(model(x.astype(dtype)))  # a numpy array, float64 included
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0 if dtype == np.float64 else 2e-2)


@pytest.mark.parametrize("train", [False, True])
def test_the_models_logits_are_the_1x1_heads_matrix_times_each_pixels_features_plus_bias(train):
    """GUIDE.md: the network ends in a per-pixel linear classifier. Through the whole model (padding to
    2**depth and the crop back, batch norm folded in inference or on batch statistics in training)."""
    model = UNet(5, features=4, depth=2, rngs=nnx.Rngs(0))
    head = model.head.layers[0]
    head.bias[...] = jnp.arange(5.0) - 2  # a bias that is not zero, so it is checked too
    if not train:
        model.eval()
    x = np.random.default_rng(0).random((2, 13, 11, 3), np.float32)  # padded to 16 x 12 inside
    graph, state = nnx.split(model)

    @jax.jit
    def features_and_logits(state, x):  # the same state for both: in training each call updates it
        return nnx.merge(graph, state).features(x), nnx.merge(graph, state)(x)

    features_BHWC, logits_BHWK = features_and_logits(state, x)
    assert features_BHWC.shape == (2, 16, 12, 4) and logits_BHWK.shape == (2, 13, 11, 5)
    w_CK = np.asarray(head.kernel[...], np.float64)[0, 0]
    b_K = np.asarray(head.bias[...], np.float64)
    f = np.asarray(features_BHWC, np.float64)
    for b, i, j in [(0, 0, 0), (1, 12, 10), (0, 6, 5), (1, 3, 9)]:
        np.testing.assert_allclose(logits_BHWK[b, i, j], f[b, i, j] @ w_CK + b_K, rtol=1e-5, atol=1e-5)
