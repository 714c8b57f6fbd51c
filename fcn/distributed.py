"""Joining a multi-process (multi-host) JAX job, before JAX touches any device.

Every process of a job runs the same command; `maybe_initialize` connects it
to the others through `jax.distributed.initialize`, after which
`jax.devices()` lists the devices of all processes and the `data` mesh of
`fcn.sharding` spans them. Where the values come from, first match wins:

1. arguments (the `--coordinator`, `--num_processes`, `--process_id` flags);
2. environment variables `FCN_COORDINATOR` (host:port of process 0),
   `FCN_NUM_PROCESSES`, `FCN_PROCESS_ID`;
3. a managed cluster JAX detects by itself: a Slurm step with more than one
   task, an Open MPI job (`mpirun`), a Cloud TPU VM (or a TPU pod on GKE).

Nothing set and no cluster found: a single process, nothing to do.
`FCN_DISTRIBUTED=0` turns the cluster detection off (one process inside a
Slurm allocation, say).
"""

from __future__ import annotations

import errno
import glob
import importlib.util
import logging
import os
import socket

import jax

log = logging.getLogger("fcn")

ENV = {"coordinator": "FCN_COORDINATOR", "num_processes": "FCN_NUM_PROCESSES", "process_id": "FCN_PROCESS_ID"}


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def detect_cluster() -> str | None:
    """The managed cluster this process runs in with several processes, or None."""
    env = os.environ
    if env.get("FCN_DISTRIBUTED", "").lower() in ("0", "false", "off", "no"):
        return None
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    # Tasks of this step: a batch script itself is one task, whatever the job's --ntasks.
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if all(k in env for k in slurm) and (_int(tasks, "SLURM_STEP_NUM_TASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    if any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "tpu"
    # A Cloud TPU VM (libtpu installed, TPU chips present): JAX asks the metadata server for the slice.
    if importlib.util.find_spec("libtpu") is not None and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    return None


class DistributedError(RuntimeError):
    """This process could not join its multi-process job; the message says why and what to check."""


def maybe_initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join the multi-process job this process belongs to, if any; True when it did (or had).

    Call it first, before any JAX computation or `jax.devices()`. A value that cannot work raises
    ValueError naming it (its flag, or its variable where that set it); a failure to join,
    DistributedError.
    """
    if jax.distributed.is_initialized():
        return True
    # Each value's name in messages: the flag, or the variable it came from.
    args = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    name = {k: f"--{k}" if v is not None else ENV[k] for k, v in args.items()}
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    if num_processes is None:
        num_processes = _int(os.environ.get(ENV["num_processes"]), ENV["num_processes"])
    if process_id is None:
        process_id = _int(os.environ.get(ENV["process_id"]), ENV["process_id"])
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                "a multi-process run needs all of --coordinator, --num_processes and --process_id "
                f"(or {', '.join(ENV.values())}); missing: " + ", ".join(f"--{k} ({ENV[k]})" for k in missing)
            )
        if num_processes < 1:
            raise ValueError(f"{name['num_processes']}={num_processes} must be at least 1")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"{name['process_id']}={process_id} must be in [0, {name['num_processes']}={num_processes})"
            )
        if num_processes == 1:
            return False
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{name['coordinator']}={coordinator!r} must be host:port of process 0, with a port in "
                "1..65535, e.g. 10.0.0.1:1234"
            )
        if process_id == 0 and not _port_free(int(port)):
            # Checked here: jax's own failure to listen there was a traceback, or a segmentation fault.
            raise DistributedError(
                f"process 0 of {num_processes} cannot listen on port {port} ({name['coordinator']}={coordinator}): "
                "another program (an earlier run?) uses it. End it, or choose another port for every process"
            )
        _cpu_collectives()
        log.info("joining %d processes as process %d through %s", num_processes, process_id, coordinator)
        hint = "" if process_id == 0 else f" Is process 0 running, and {coordinator} reachable from this host?"
        who = f"process {process_id} of {num_processes} could not join the job through {coordinator}"
        _initialize(who, hint, coordinator, num_processes, process_id)
        return True
    cluster = detect_cluster()
    if cluster is None:
        return False
    _cpu_collectives()
    log.info("%s cluster detected: jax.distributed.initialize()", cluster)
    hint = " Check the job's settings, or set FCN_DISTRIBUTED=0 to run this process alone."
    _initialize(f"this process could not join its {cluster} job (found by jax.distributed.initialize())", hint)
    return True


def _initialize(who: str, hint: str, *args) -> None:
    """`jax.distributed.initialize(*args)`; a failure is a DistributedError of one line, `who: why.hint`."""
    try:
        jax.distributed.initialize(*args)
    except Exception as e:  # noqa: BLE001 - jax raises its runtime's errors: said in one line
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise DistributedError(f"{who}: {why}.{hint}") from e


def _port_free(port: int) -> bool:
    """Whether a server can listen on `port` of every interface, as process 0's coordination service does."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a closed run's port is free
                s.bind((address, port))
                return True
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
    return True  # no IPv6 nor IPv4 socket to try with: leave it to jax


def _cpu_collectives() -> None:
    """CPU devices of different processes talk through gloo (the default since JAX 0.4.3x; older ones had none)."""
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
