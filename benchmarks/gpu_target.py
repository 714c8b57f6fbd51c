"""Lowering for an NVIDIA GPU on a machine without one: the tests' "lowers to Triton" checks and
benchmarks/triton_registers.py."""

import contextlib

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType


@contextlib.contextmanager
def abstract_gpu(kind: str = "NVIDIA H200"):
    """Inside, a lowering for "cuda" compiles Pallas' Triton kernels for a GPU of `kind` where there is none.

    jax 0.11's Triton lowering asks the device for its compute capability and, on a CPU, stops at "No
    supported GPU devices found, please specify an abstract GPU device using AbstractDevice"; jax 0.10's
    lowered without asking. A one-device abstract mesh of Auto axes carries the device kind and changes
    no sharding; it must be in place when the function is traced, not only when it is lowered."""
    device = AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
    mesh = AbstractMesh((1,), ("gpu",), (AxisType.Auto,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
