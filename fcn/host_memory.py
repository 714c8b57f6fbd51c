"""Host memory on XLA:CPU: freed memory kept in the process, and training steps run one at a time.

XLA:CPU takes a program's temporaries from the host heap each time it runs.
`retain_freed_memory` keeps glibc from handing them back to the kernel (and
faulting them in again at every step); `StepPacer` keeps a training loop
from starting a step while the last one's temporaries are still allocated.
Both are no-ops off glibc, and the pacer off XLA:CPU. `set_up_objects_frozen`
keeps Python's collector off the loop's long-lived objects. Measurements:
docs/benchmarks.md (the eighth, ninth and twelfth sessions).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

import jax


def one_step_at_a_time(devices=None) -> bool:
    """Whether a training loop should wait for each step before starting the next: True on XLA:CPU.

    XLA:CPU takes a program's temporaries (the activations a training step
    keeps for its backward pass: 600 MB for configs/camvid_cpu.py, 9.7 GB for
    the full CamVid recipe) from the host heap when the program starts and
    frees them when it ends. A step queued behind the one before starts as
    soon as that one's outputs are ready, before its temporaries are freed, so
    two or three steps' temporaries were alive at once; and under
    `retain_freed_memory` the heap keeps that peak for good. `StepPacer` does
    the waiting. Accelerators allocate on the device's own stream: no waiting
    there.
    """
    devices = jax.devices() if devices is None else devices
    return all(d.platform == "cpu" for d in devices)


class StepPacer:
    """Starts a training step on XLA:CPU only once the one before has ended and its temporaries are freed.

        pacer = StepPacer(devices)
        while ...:
            batch = ...               # made while the step before runs
            pacer.wait()
            state, out = train_step(state, *batch)
            pacer.started(out)

    `wait` blocks until the last step's outputs are ready, and then until the
    C library has that step's temporaries back: XLA:CPU frees them just after
    the outputs are ready, on the thread that ran the step, and a step started
    in between gets a second set beside them, which the heap then keeps
    (`one_step_at_a_time`). It polls glibc's count of bytes in use
    (mallinfo2) until no more than half of what the step added since it
    started is still in use, for at most `timeout_s`. On configs/camvid_cpu.py
    the temporaries of half the steps were still allocated when the outputs
    were ready, and came back within 0.3-1.5 ms. Three alternating pairs of
    300-step train.py runs: peak resident memory 1.3-1.9 GB against 2.6-3.2 GB
    with the outputs alone waited for, at the same rate (docs/benchmarks.md,
    twelfth session). The heap can still grow by a set now and then: glibc
    2.36 asks for a little more than an aligned block's size, so a freed block
    with a small allocation just after it does not serve the same request
    again. Off an XLA:CPU device, or without glibc's mallinfo2, it only waits
    for the outputs (on accelerators not even that).
    """

    def __init__(self, devices=None, *, timeout_s: float = 0.05, min_bytes: int = 32 << 20, in_use=None):
        self.enabled = one_step_at_a_time(devices)
        self.timeout_s, self.min_bytes = timeout_s, min_bytes
        self._in_use = (in_use or heap_in_use()) if self.enabled else None
        self._running = self._before = None
        self.waits, self.timeouts, self.waited_s = 0, 0, 0.0  # heap waits, those cut short, their time

    def wait(self) -> None:
        """Before starting a step: the step before has ended, and its temporaries are freed."""
        if self._running is not None:
            jax.block_until_ready(self._running)
            self._running = None
            self._settle()
        if self._in_use is not None:
            self._before = self._in_use()

    def started(self, out) -> None:
        """After starting a step: `out`, any of its outputs, is what `wait` waits for."""
        if self.enabled:
            self._running = out

    def _settle(self) -> None:
        if self._in_use is None or self._before is None:
            return
        added = self._in_use() - self._before
        if added < self.min_bytes:
            return  # freed already, or too little to matter
        target, t0 = self._before + added // 2, time.perf_counter()
        self.waits += 1
        while self._in_use() > target:
            if time.perf_counter() - t0 > self.timeout_s:
                self.timeouts += 1
                break
            time.sleep(1e-4)
        self.waited_s += time.perf_counter() - t0


def heap_in_use() -> Callable[[], int] | None:
    """A function giving the bytes glibc's malloc has handed out (mallinfo2: heap and mmap), or None."""
    import ctypes

    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):  # not glibc, or glibc before 2.33
        return None
    names = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in names]

    libc.mallinfo2.restype = Mallinfo2

    def in_use() -> int:
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    return in_use


def retain_freed_memory() -> bool:
    """Keep freed host memory in the process (glibc): no page faults on buffers reused every step.

    XLA:CPU allocates an executable's large temporary buffers afresh at each
    run; glibc serves them with mmap (and thread arenas release them with
    madvise), so every step faults all its pages in again: 170,000 faults per
    training step of the CamVid CPU config, about 3 us each on a virtual
    machine, a third of the step. With mmap off, one arena, and no trimming,
    freed memory is reused instead; the resident set stays at its peak. (A
    2 GiB trim threshold, the largest mallopt takes, was not enough: the
    default network's heap, alternating training and inference steps, was
    trimmed from 2.9 to 1.0 GiB and faulted back in, 460,000 faults; -1 turns
    trimming off.) Call it first, before jax starts its threads (arenas made
    earlier stay). The one arena has one lock, which XLA's threads then wait
    on: about 670 context switches per camvid_cpu step, against about 290
    with jemalloc preloaded instead (the same speed within the spread once
    compiled; docs/benchmarks.md, ninth session). More arenas would let the
    step's temporaries land in a thread's arena, which glibc serves with mmap
    above 64 MB whatever M_MMAP_MAX says: faults at every step again.
    Returns False where the C library is not glibc (nothing changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, -1) == 1  # -1: never trim
    ok &= libc.mallopt(m_arena_max, 1) == 1
    return bool(ok)


def _glibc():
    """The C library through ctypes where it is glibc (Linux), else None."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


# The interpreter's own when fcn.host_memory is imported: Python 3.12.1 starts with 375 (3.11, 3.13: none), no
# caller's freeze; taken for one, they had kept the loop from freezing anything.
_FROZEN_AT_START = gc.get_freeze_count()


@contextlib.contextmanager
def set_up_objects_frozen():
    """Python's cyclic collector leaves alone the objects made so far (jax, flax, the compiled
    step: about 240,000, alive for the whole run) while inside: a full walk of them took
    180-200 ms, once every 20-60 steps (docs/benchmarks.md, eighth session). They are handed
    back on leaving, so a notebook that trains again gets its garbage collected; a freeze of
    the caller's own is left as it is."""
    if gc.get_freeze_count() > _FROZEN_AT_START:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
