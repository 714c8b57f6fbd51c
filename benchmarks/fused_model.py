"""fcn's model with benchmarks/fused_block.py's `fused_block` in its conv blocks: the whole training
step with the prototype kernels in it, for benchmarks/speed.py's end-to-end variant.

    python benchmarks/speed.py --conv_impls 'gemm,gemm+fused:128x64x32x4x3:conv1:dgrad' ...

fused_block.py times each block alone and adds up what a step would save. What the step itself
gives can differ: XLA fuses fcn's batch norm + ReLU into the ops around the block (the pooling, the
upsampling's concatenation), which a custom_vjp's boundary stops. A variant named
`IMPL+fused:SPEC` is fcn with config.model.conv_impl IMPL and, inside `patched(SPEC)`, every
ConvBlock that fused_block can compute (training-mode batch norm, no bottleneck, conv2's channels
fitting the setting) computed by it; the others, and inference, run as fcn's. SPEC is
'SETTINGS[:conv1][:dgrad][:head]'. SETTINGS: one setting as fused_conv.py's --kernels
('BMxBNxBKxWARPSxSTAGES') for every block, and/or '/'-separated 'WIDTH@SETTING' for the blocks of
WIDTH output channels (fused_block.py's fastest setting may differ from block to block). `conv1`
and `dgrad`: fused_block's first_kernel and dgrad_kernel. `head`: config.loss.fused_head "head"
(the last block's batch norm stays in the block, which fused_block then computes; with
"head+norm", "auto"'s choice on a Hopper GPU, that block runs as fcn's).
Not a test, and not used by fcn.
"""

from __future__ import annotations

import contextlib

from benchmarks.conv_kernels import fits, parse_setting
from benchmarks.fused_block import block_epsilon, block_params, fused_block, update_stats
from fcn.model import ConvBlock

FLAGS = ("conv1", "dgrad", "head")


def parse(spec: str) -> tuple[dict, set]:
    """'SETTINGS[:conv1][:dgrad][:head]' -> ({output channels or None: the kernels' setting}, the flags);
    SETTINGS is 'BMxBNxBK[xWARPSxSTAGES]' for every block, and/or '/'-separated 'WIDTH@SETTING' for the
    blocks with WIDTH output channels (the others: the plain one, or fcn's without one). A ValueError
    naming the spec where a part is not understood."""
    settings, *flags = spec.split(":")
    out, bad = {}, [f for f in flags if f not in FLAGS]
    for item in settings.split("/"):
        width, _, setting = item.rpartition("@")
        try:
            kernels = parse_setting(setting)
            key = int(width) if width else None
        except ValueError:
            kernels, key = {}, None
        if len(kernels) < 3 or key in out:
            bad.append(item)
        out[key] = kernels
    if bad:
        raise ValueError(
            f"fused spec {spec!r}: {', '.join(map(repr, bad))} not understood; expected BMxBNxBK[xWARPSxSTAGES] "
            f"and/or WIDTH@BMxBNxBK[...], '/'-separated, then any of :{', :'.join(FLAGS)}"
        )
    return out, set(flags)


def setting_for(block: ConvBlock, settings: dict) -> dict | None:
    """The setting (channels cut to conv2's) fused_block computes `block` with; None where it does not:
    not training-mode batch norms, a bottleneck, no setting for its width or conv2's channels not
    fitting it."""
    try:
        block_epsilon(block)
    except ValueError:
        return None
    c_out = block.convs[1].out_features
    setting = settings.get(c_out, settings.get(None))
    return None if setting is None or fits(c_out, c_out, setting) is None else setting


@contextlib.contextmanager
def patched(spec: str, counter: list | None = None, interpret: bool | None = None):
    """Within: ConvBlock.__call__ by fused_block where `setting_for` gives a setting (appending each
    fused block's output channels to `counter` when given, as it is traced); fcn's own elsewhere.
    `interpret`: the kernels' (None: interpreted off a GPU)."""
    settings, flags = parse(spec)
    original = ConvBlock.__call__

    def call(self, x_BHWC, *, last_norm: bool = True):
        setting = setting_for(self, settings)
        if not last_norm or setting is None:
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
