"""One fcn cache folder and one persistent compilation cache for the whole test session.

Nothing is read from or written to ~/.cache/fcn. A program one test compiles (in
this process or in a training process it starts, which inherits the environment)
is read back by the next test that needs it, rather than compiled again. Under
pytest-xdist the workers share both folders; jax's cache and fcn's are written
atomically, so concurrent writers are safe.
"""

import os

import pytest

# XLA:CPU options for programs a test runs once or a few times: compiled without LLVM's optimisation, in
# about half the time. Both sides of a comparison are compiled so. As jit's compiler_options, and as
# XLA_FLAGS for a training process a test starts.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_XLA = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())


@pytest.fixture(autouse=True, scope="session")
def _fcn_cache_dir(tmp_path_factory):
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FCN_CACHE_DIR", str(root / "fcn_cache"))
        mp.setenv("FCN_JAX_CACHE", str(root / "jax_cache"))
        from fcn.traced import enable_compilation_cache

        enable_compilation_cache()
        yield


@pytest.fixture
def diverge_at(monkeypatch):
    """`diverge_at(step, grad_norm=False)`: from then on, the training step turns the weights NaN after
    `step` (as a diverging update leaves them), and its gradient norm too with `grad_norm`; the loss it
    reports for that step stays finite. Undone with the test's `monkeypatch`."""
    import jax
    import numpy as np

    from fcn import state as state_lib

    jit_train_step = state_lib.jit_train_step

    def setup(at: int, grad_norm: bool = False) -> None:
        def diverging(*args, **kwargs):
            step = jit_train_step(*args, **kwargs)

            def run(state, *batch):
                state, out = step(state, *batch)
                if int(state["step"]) == at:
                    state = {**state, "params": jax.tree.map(lambda p: p * np.nan, state["params"])}
                    if grad_norm:
                        out = {**out, "grad_norm": out["grad_norm"] * np.nan}
                return state, out

            return run

        monkeypatch.setattr(state_lib, "jit_train_step", diverging)

    return setup


@pytest.fixture(scope="session")
def oom_error():
    """XLA's own out-of-memory error, raised for real by a program that asks for 16 PiB: more than any
    machine's address space, so no allocator grants it (a test that raises it loses no memory)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: jnp.broadcast_to(x, (2**52,)) + 1)(jnp.float32(1)).block_until_ready()
    except jax.errors.JaxRuntimeError as e:
        return e
    pytest.fail("16 PiB were allocated")
