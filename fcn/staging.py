"""Staging: a command writes its output in full into a hidden file or folder beside its destination
and moves it into place at the end. `write_atomic` does it for one file; `staging_folder` makes a
folder for it, and removes those of killed commands.

A process holds a lock (flock, on the folder itself) on its staging folder for as long as the folder
exists, and the lock goes with the process, SIGKILL included. So a folder of the prefix that can be
locked belongs to no live process, however recent, and one that cannot is left alone, however old.
Neither age nor a pid could tell: a TensorFlow export takes minutes, a killed process's pid may be
another process's by the next run, and a folder on a shared disk may be another machine's.

A sweep removes only real folders (not links) whose name has the prefix, that no process holds and
that hold the marker file every staging folder gets first (`OWNER`: the pid and host, for a person
who finds one); one killed before its marker was written is removed only while empty (rmdir).
Where there is no flock (not Unix), nothing is swept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

OWNER = ".fcn-staging-owner"


def write_atomic(path: Path, content: str | Callable[[Path], None]) -> None:
    """Write `content` (text, or a function that writes a file at the path it is given) to a hidden
    temporary file beside `path`, then rename it over `path`: an interrupted or failed write leaves
    `path` as it was and removes the temporary file. Its name is new for each call, so two processes
    may write one path at once (the last rename wins); it is created with the umask's mode, as `path`
    would be. An OSError names `path` (a full disk's names no file). For every file fcn writes whole:
    the workdir's JSON and metrics.jsonl, evaluation's pictures, predict's PNGs, cache entries."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except OSError as e:
        e.filename = str(path)
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # gone after the rename


def this_process() -> str:
    """'pid N on HOST': who holds a lock, for the person (or the refusal) that finds it held."""
    return f"pid {os.getpid()} on {socket.gethostname()}"


def lock_folder(folder: Path, *, wait: bool = False) -> int | None:
    """An exclusive lock (flock) on `folder` itself: the descriptor that holds it (closing it releases
    the lock, as the process's end does, SIGKILL included), or None where no lock is to be had (not
    Unix, a file system without locks, a folder that cannot be opened). Without `wait`,
    BlockingIOError while another process, or another call in this one, holds it. No lock file is
    left behind."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (ImportError, OSError):  # not Unix; a folder that cannot be opened: what writes there says why
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise
        return None  # ENOLCK, EOPNOTSUPP: a file system without locks
    return fd


@contextlib.contextmanager
def staging_folder(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/<prefix><random>`, locked by this process, for the block; removed after it with
    whatever the block left in it. First removes the folders of `prefix` in `parent` that killed processes
    left (`remove_abandoned`)."""
    remove_abandoned(parent, prefix)
    path, fd = _create(parent, prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)  # releases the lock


def _create(parent: Path, prefix: str) -> tuple[Path, int | None]:
    try:
        import fcntl
    except ImportError:
        fcntl = None
    while True:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        fd = None
        if fcntl is not None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another process's sweep holds it
            try:
                ours = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:  # that sweep locked it first, before this process could, and removed it
                ours = False
            if not ours:
                os.close(fd)
                continue
        (path / OWNER).write_text(f"{this_process()}\n")
        return path, fd


def remove_abandoned(parent: Path, prefix: str) -> list[Path]:
    """Remove the staging folders of `prefix` in `parent` that no live process holds; returns them."""
    try:
        import fcntl

        entries = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except (ImportError, OSError):  # not Unix, or no parent yet
        return []
    removed = []
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # a file or a link, not a staging folder; or gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live process's
            if not os.path.samestat(os.fstat(fd), os.lstat(path)):
                continue  # replaced meanwhile
            if (path / OWNER).is_file():
                shutil.rmtree(path)
            else:
                os.rmdir(path)  # only if empty: a folder without the marker may not be a staging folder
            removed.append(path)
            logger.warning("removed %s, left by a process that was killed while writing it", path)
        except OSError:
            pass  # held by a live process, not empty, or not ours to remove
        finally:
            os.close(fd)
    return removed
