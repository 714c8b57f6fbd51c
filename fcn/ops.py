"""Backend-specific convolution implementations, behind one seam.

`conv_fn(name)` returns the `conv_general_dilated` that every conv of the
model uses (`config.model.conv_impl`). "xla" is jax.lax's own convolution.
"""

from __future__ import annotations

from collections.abc import Callable

CONV_IMPLS = ("xla",)


def conv_fn(name: str) -> Callable | None:
    """The convolution primitive for `config.model.conv_impl`; None = jax.lax's default."""
    if name == "xla":
        return None
    raise ValueError(f"model.conv_impl={name!r}: expected one of {', '.join(CONV_IMPLS)}")
