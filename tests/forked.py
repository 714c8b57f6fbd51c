"""`python ARGS...` for many commands, without starting Python and importing JAX and fcn for each.

`run(commands)` starts one Python process (this file) that imports what the commands import, then forks
a copy of itself for each command, which runs it as `python` would: `["train.py", ...]` as the script
(runpy.run_path as __main__, argv[0] the script), `["-m", "fcn.evaluate", ...]` as the module, with its
cwd, its stdout and stderr (file descriptors 1 and 2, so C-level output too), its exit code (SystemExit's,
1 and the traceback for an uncaught exception) and its atexit handlers. What differs from a fresh
`python` is the start only: about 2 s of CPU a command (3 s and more on a busy 2-core machine), most of it
importing JAX.
The copies run two at a time; the parent never touches a device, so each child initialises JAX itself.
A test of the start itself (a process's imports, signals, `--help`'s usage) starts a real process.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported before forking: what train.py, fcn.evaluate and fcn.predict import first (not those modules
# themselves: `-m fcn.evaluate` after `import fcn.evaluate` warns, as python itself would).
PRELOAD = ("jax", "flax.nnx", "optax", "absl.app", "ml_collections.config_flags", "fcn.cli", "fcn.config")


def run(commands: list[dict], env: dict | None = None, jobs: int = 2, timeout: float = 600) -> list:
    """Each of `commands`, {"args": [...python's arguments], "cwd": folder (ROOT if left out)}, run in this
    process's environment updated with `env`; its outcome as a subprocess.CompletedProcess, as
    subprocess.run(..., capture_output=True, text=True) gives it, in the order of `commands`."""
    commands = [{"cwd": str(ROOT), **c, "args": [str(a) for a in c["args"]]} for c in commands]
    server = subprocess.Popen(
        [sys.executable, __file__, str(jobs)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its children with it, should they outlive `timeout`
    )
    try:
        out, err = server.communicate(json.dumps(commands), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.communicate()
        raise
    done = subprocess.CompletedProcess(server.args, server.returncode, out, err)
    if done.returncode != 0:
        raise RuntimeError(f"tests/forked.py failed ({done.returncode}):\n{done.stderr}")
    return [
        subprocess.CompletedProcess([sys.executable, *c["args"]], r["returncode"], r["stdout"], r["stderr"])
        for c, r in zip(commands, json.loads(done.stdout))
    ]


def _child(command: dict, out: str, err: str) -> None:
    """In the forked copy: run the command as `python ARGS` would, then exit with its code."""
    import atexit
    import runpy
    import traceback

    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        f = os.open(path, flags | (os.O_CREAT if fd else 0))
        os.dup2(f, fd)
        os.close(f)
    os.chdir(command["cwd"])
    args = command["args"]
    code = 0
    try:
        if args[0] == "-m":
            sys.argv = [args[1], *args[2:]]  # (runpy sets argv[0] to the module's file)
            sys.path[0] = os.getcwd()
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(args)
            sys.path[0] = os.path.dirname(os.path.abspath(args[0]))
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - as python prints an uncaught exception
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve(jobs: int) -> None:
    import importlib
    import shutil
    import tempfile
    import threading

    commands = json.load(sys.stdin)
    for name in PRELOAD:
        importlib.import_module(name)
    # A fork copies only the forking thread: a lock another thread held would stay locked in every child.
    # Should an import above ever start a thread, say so rather than risk children that hang.
    if threading.active_count() != 1:
        raise RuntimeError(f"tests/forked.py: importing {PRELOAD} started threads: {threading.enumerate()}")
    results = [None] * len(commands)
    tmp = tempfile.mkdtemp()  # (not a TemporaryDirectory: its finalizer, an atexit handler, runs in each child)
    try:
        files = [(f"{tmp}/{i}.out", f"{tmp}/{i}.err") for i in range(len(commands))]
        running, todo = {}, list(range(len(commands)))
        while todo or running:
            while todo and len(running) < jobs:
                i = todo.pop(0)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    try:
                        _child(commands[i], *files[i])
                    finally:
                        os._exit(70)  # (never left but by os._exit)
                running[pid] = i
            pid, status = os.wait()
            i = running.pop(pid)
            with open(files[i][0]) as out, open(files[i][1]) as err:
                results[i] = {
                    "returncode": os.waitstatus_to_exitcode(status),
                    "stdout": out.read(),
                    "stderr": err.read(),
                }
    finally:
        shutil.rmtree(tmp)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # this checkout's fcn, as `python train.py` in it imports (not an installed one)
    _serve(int(sys.argv[1]))
