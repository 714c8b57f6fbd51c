"""fcn.host_memory: freed host memory kept in the process, and training steps paced on XLA:CPU."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcn import host_memory


def test_retain_freed_memory_in_a_fresh_process():
    # A process-wide allocator setting: checked in a child, not in the test process.
    code = "import platform; from fcn import host_memory as m; print(m.retain_freed_memory(), platform.libc_ver()[0])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    out = run.stdout.split()
    assert out[0] == str(out[1] == "glibc")


def test_step_pacer_waits_until_the_step_temporaries_are_freed():
    # XLA:CPU frees a step's temporaries just after its outputs are ready; the next step waits for that.
    import threading
    import time

    heap = {"bytes": 1 << 30}
    pacer = host_memory.StepPacer(jax.devices("cpu"), in_use=lambda: heap["bytes"], timeout_s=5)
    pacer.wait()  # nothing running yet: the heap is marked
    heap["bytes"] += 600 << 20  # the step's temporaries
    pacer.started(jnp.ones(3))
    threading.Timer(0.05, lambda: heap.update(bytes=heap["bytes"] - (600 << 20))).start()
    t = time.perf_counter()
    pacer.wait()
    assert time.perf_counter() - t >= 0.04 and (pacer.waits, pacer.timeouts) == (1, 0)

    heap["bytes"] += 8 << 20  # less than min_bytes added: no wait
    pacer.started(jnp.ones(3))
    pacer.wait()
    assert pacer.waits == 1

    pacer.timeout_s = 0.02
    heap["bytes"] += 600 << 20  # never freed: it gives up after timeout_s
    pacer.started(jnp.ones(3))
    pacer.wait()
    assert (pacer.waits, pacer.timeouts) == (2, 1)


def test_step_pacer_does_not_wait_on_accelerators():
    def in_use():
        raise AssertionError("the heap is not read off a CPU")

    pacer = host_memory.StepPacer([type("Gpu", (), {"platform": "gpu"})()], in_use=in_use)
    pacer.wait()
    pacer.started(jnp.ones(3))
    pacer.wait()
    assert not pacer.enabled and pacer.waits == 0


def test_heap_in_use_counts_what_malloc_hands_out():
    in_use = host_memory.heap_in_use()
    if in_use is None:
        pytest.skip("the C library is not glibc 2.33 or later (no mallinfo2)")
    before = in_use()
    a = np.ones(64 << 20, np.uint8)
    during = in_use()
    del a
    assert during - before >= 60 << 20 and during - in_use() >= 60 << 20
