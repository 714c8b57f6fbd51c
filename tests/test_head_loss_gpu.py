"""fcn.head_loss's kernel lowered for an NVIDIA GPU, on a machine without one (benchmarks/gpu_target.py)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks.gpu_target import abstract_gpu
from fcn import head_loss
from tests.test_head_loss import EPS, _bn_params


def test_lowers_to_one_triton_kernel_for_a_gpu():
    """Every operation in the kernel has a Triton lowering (checked without a GPU: lowering for CUDA
    needs none, only the kind of GPU to lower for); compiling the Triton code needs one (benchmarks/run_gpu.sh)."""
    x = jax.ShapeDtypeStruct((2, 368, 480, 32), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((1, 1, 32, 11), jnp.float32)
    bias = jax.ShapeDtypeStruct((11,), jnp.float32)
    labels = jax.ShapeDtypeStruct((2, 360, 480), jnp.uint8)

    scale, shift = _bn_params(32)

    def loss_and_grads(x, kernel, bias, labels, bn):
        def fn(*a):
            bn_args = (scale, shift, EPS) if bn else None
            out = head_loss.linear_head_cross_entropy(*a, labels, bn=bn_args, interpret=False)
            return out[0] if bn else out

        return jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True)(x, kernel, bias)

    for bn in (False, True):
        with abstract_gpu():  # when traced: the mesh a lowering sees is the trace's
            lowered = jax.jit(loss_and_grads, static_argnums=4).trace(x, kernel, bias, labels, bn)
            text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 1, bn
        assert "grid_x = 345" in text  # 2 x 368 x 480 pixels, 8 steps of 128 an instance


def test_a_step_with_the_kernel_can_be_kept_traced():
    """fcn.traced keeps the training step as a jax.export program: the Triton kernel must pass its
    checks (exported for CUDA here, which needs no GPU), as jax refuses it by default."""
    from jax import export

    from fcn import traced

    x = jax.ShapeDtypeStruct((2, 32, 32, 32), jnp.bfloat16)
    kernel = jax.ShapeDtypeStruct((1, 1, 32, 11), jnp.float32)
    bias = jax.ShapeDtypeStruct((11,), jnp.float32)
    labels = jax.ShapeDtypeStruct((2, 30, 32), jnp.uint8)

    def fn(x, kernel, bias, labels):
        loss_fn = lambda *a: head_loss.linear_head_cross_entropy(*a, labels, interpret=False)  # noqa: E731
        return jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(x, kernel, bias)

    with abstract_gpu():
        with pytest.raises(ValueError, match="custom call"):
            export.export(jax.jit(fn), platforms=("cuda",))(x, kernel, bias, labels)
        exported = export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=traced.export_checks())(
            x, kernel, bias, labels
        )
    assert head_loss.TRITON_CALL in exported.mlir_module()
