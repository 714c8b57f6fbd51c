"""fcn's model with benchmarks/fused_block.py's `fused_block` in its conv blocks: the whole training
step with the prototype kernels in it, for benchmarks/speed.py's end-to-end variant.

    python benchmarks/speed.py --conv_impls 'gemm,gemm+fused:128x64x32x4x3:conv1:dgrad' ...

fused_block.py times each block alone and adds up what a step would save. What the step itself
gives can differ: XLA fuses fcn's batch norm + ReLU into the ops around the block (the pooling, the
upsampling's concatenation), which a custom_vjp's boundary stops. A variant named
`IMPL+fused:SPEC` is fcn with config.model.conv_impl IMPL and, inside `patched(SPEC)`, every
ConvBlock that fused_block can compute (training-mode batch norm, no bottleneck, conv2's channels
fitting the setting) computed by it; the others, and inference, run as fcn's. SPEC is
'SETTING[:conv1][:dgrad][:head]': SETTING as fused_conv.py's --kernels ('BMxBNxBKxWARPSxSTAGES'),
`conv1` and `dgrad` as fused_block's first_kernel and dgrad_kernel, `head` to set
config.loss.fused_head "head" (the last block's batch norm stays in the block, which fused_block
then computes; with "head+norm", "auto"'s choice on a Hopper GPU, that block runs as fcn's).
Not a test, and not used by fcn.
"""

from __future__ import annotations

import contextlib

from benchmarks.conv_kernels import fits, parse_setting
from benchmarks.fused_block import block_epsilon, block_params, fused_block, update_stats
from fcn.model import ConvBlock

FLAGS = ("conv1", "dgrad", "head")


def parse(spec: str) -> tuple[dict, set]:
    """'SETTING[:conv1][:dgrad][:head]' -> (the kernels' setting, the flags); a ValueError naming a
    part it does not know."""
    setting, *flags = spec.split(":")
    unknown = [f for f in flags if f not in FLAGS]
    try:
        kernels = parse_setting(setting)
    except ValueError:
        unknown.insert(0, setting)
        kernels = {}
    if unknown or len(kernels) < 3:
        raise ValueError(f"fused spec {spec!r}: expected BMxBNxBK[xWARPSxSTAGES] then any of :{', :'.join(FLAGS)}")
    return kernels, set(flags)


def split_variant(variant: str) -> tuple[str, str | None]:
    """speed.py's fcn variant 'IMPL' or 'IMPL+fused:SPEC' -> (IMPL, SPEC or None)."""
    impl, sep, spec = variant.partition("+fused:")
    return impl, (spec if sep else None)


def fusable(block: ConvBlock, setting: dict) -> bool:
    """Whether fused_block computes `block`: training-mode batch norms, no bottleneck, conv2's channels
    fitting `setting`."""
    try:
        block_epsilon(block)
    except ValueError:
        return False
    c_out = block.convs[1].out_features
    return fits(c_out, c_out, setting) is not None


@contextlib.contextmanager
def patched(spec: str, counter: list | None = None, interpret: bool | None = None):
    """Within: ConvBlock.__call__ by fused_block where `fusable` (appending each fused block's output
    channels to `counter` when given, as it is traced); fcn's own elsewhere. `interpret`: the kernels'
    (None: interpreted off a GPU)."""
    setting, flags = parse(spec)
    original = ConvBlock.__call__

    def call(self, x_BHWC, *, last_norm: bool = True):
        if not last_norm or not fusable(self, setting):
            return original(self, x_BHWC, last_norm=last_norm)
        from flax import nnx

        x_BHWC = x_BHWC.astype(self.convs[0].dtype or x_BHWC.dtype)  # as nnx.Conv casts its input (images: float32)
        params = block_params(nnx.state(self, nnx.Param))
        out, stats = fused_block(
            params,
            x_BHWC,
            eps=block_epsilon(self),
            first_kernel="conv1" in flags,
            setting=setting,
            dgrad_kernel="dgrad" in flags,
            interpret=interpret,
        )
        update_stats(self, stats)
        if counter is not None:
            counter.append(self.convs[1].out_features)
        return out

    ConvBlock.__call__ = call
    try:
        yield flags
    finally:
        ConvBlock.__call__ = original
