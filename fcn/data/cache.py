"""fcn's cache folder, and decoded splits kept there so that a second run skips the decoding.

Decoding CamVid's training split (367 JPEG frames and PNG masks) took 1.2-1.4 s
of a 6 s warm start on 2 cores (docs/benchmarks.md). `decode_all` stores a
split here when its `Examples` carry a key (`Examples.key_fn`; the image/mask
folder sources give one, from `data.cache_decoded`) and reads it back while the
key is unchanged; `fcn.data.pipeline.stack` keeps the training canvas made from
it under a key derived from the split's. Entries are read memory-mapped
(`load_arrays`): reading the split into memory took 0.5-1.1 s, most of it page
faults of fresh memory on a virtual machine; mapped, nothing is read until used.

The key covers everything the decoded pixels depend on: each file's path,
size, inode and modification and change times, the decoding settings (class count, ignore label,
value and colour maps, max_size, skip_bad), and the source of the decoding
code itself. Change any one and the entry is not found, so a stale split is
never used. A split with bad files skipped (`data.skip_bad`) is not kept, so
every run reports what it skipped. Every entry of the cache folder (decoded splits, canvases,
the kept step and initial state of fcn/traced.py) ends with the CRC-32 of its contents, checked
before it is used (`read_entry`); one that cannot be read (truncated, foreign) or whose bytes
changed is logged once, deleted and decoded afresh, never used. Entries are written to a
temporary file and renamed into place, so a run stopped midway leaves no half entry; the oldest
are deleted once the folder holds more than $FCN_DECODED_CACHE_GB
(default 4) GiB, and an entry larger than that is not written at all.
Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fcn.staging import write_atomic

logger = logging.getLogger(__name__)

FORMAT = 2  # bump when the layout of an entry changes (2: ends with its checksum, `_SEAL`)
_SUFFIX = ".split"
# Every entry ends with this and the CRC-32 of all bytes before it (4 bytes, big-endian). CRC-32, not
# SHA-256: a warm start of configs/camvid_cpu.py checks 392 MiB of entries, which SHA-256 read at
# 0.9 GiB/s on 2 busy cores and zlib's CRC-32 at 3.3 GiB/s (docs/benchmarks.md). It is there to
# catch damage (a flipped bit, a zeroed block), not forgery: whoever can write the cache folder
# can write fcn's source files too.
_SEAL = b"fcn-crc32:"
_SEAL_BYTES = len(_SEAL) + 4


def cache_root() -> Path:
    """$FCN_CACHE_DIR, else $XDG_CACHE_HOME/fcn, else ~/.cache/fcn."""
    if os.environ.get("FCN_CACHE_DIR"):
        return Path(os.environ["FCN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fcn"


def decoded_dir() -> Path:
    return cache_root() / "decoded"


def _limit_bytes() -> int:
    value = os.environ.get("FCN_DECODED_CACHE_GB", "4")
    try:  # inf: no limit (2**33 GiB, all of a 64-bit file system); -inf, nan: not a number of GiB
        return int(min(float(value), 2.0**33) * 2**30)
    except (ValueError, OverflowError):
        logger.warning("FCN_DECODED_CACHE_GB=%r is not a number of GiB; using 4", value)
        return 4 * 2**30


def files_key(files: Sequence[Sequence[os.PathLike | str]], settings: dict, code: Sequence[str]) -> str:
    """A key for decoding `files` (one tuple of paths per example) with `settings`, by the code in
    the modules `code` (their file names): it changes when any of them does."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "settings": settings}, sort_keys=True, default=repr).encode())
    for module_file in code:
        h.update(Path(module_file).read_bytes())
    for example in files:
        for f in example:
            st = os.stat(f)
            # A file rewritten in place changes mtime and ctime; one replaced, its inode too.
            stamp = (os.path.abspath(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            h.update(("\0".join(map(str, stamp)) + "\n").encode())
    return h.hexdigest()[:32]


def load(key: str, desc: str):
    """The Split stored under `key`, or None (not there, or unreadable: then deleted)."""
    from fcn.data.base import Split

    def split_of(arrays):
        images, labels, shapes, names = arrays
        names = [str(n) for n in names]
        if shapes.ndim != 2 or shapes.shape[1] != 2 or len(names) != len(shapes):
            raise ValueError(f"shapes {shapes.shape} for {len(names)} names")
        pixels = shapes.prod(axis=1)
        if images.size != 3 * pixels.sum() or labels.size != pixels.sum():
            raise ValueError("pixel counts do not match the shapes")
        ends = np.cumsum(pixels)[:-1]
        return Split(
            images=[a.reshape(h, w, 3) for a, (h, w) in zip(np.split(images, 3 * ends), shapes)],
            labels=[a.reshape(h, w) for a, (h, w) in zip(np.split(labels, ends), shapes)],
            names=names,
            key=key,
        )

    split = load_arrays(key, desc, 4, split_of)
    if split is not None:
        logger.info("%s: %d decoded examples read from %s", desc, len(split), decoded_dir() / f"{key}{_SUFFIX}")
    return split


def load_arrays(key: str, desc: str, count: int, build=lambda arrays: arrays):
    """build(the `count` arrays stored under `key`), or None: not there, or unreadable or
    refused by `build` (a ValueError), then deleted.

    The arrays are memory-mapped, read-only: nothing is read until used, and the
    pages come from the page cache (a split that took 0.5-0.9 s to read into
    memory on 2 cores maps in milliseconds; docs/benchmarks.md).
    """

    def read(path: Path):
        arrays = map_arrays(path)
        if len(arrays) != count:
            raise ValueError(f"{len(arrays)} arrays, expected {count}")
        return build(arrays)

    return read_entry(decoded_dir() / f"{key}{_SUFFIX}", read, f"{desc}: cached decoded data", "decoding again")


def read_entry(path: Path, read, what: str, again: str):
    """read(path) for an entry of fcn's cache folder whose checksum matches its contents (the
    contents end at `payload_bytes(path)`), or None: not there, or unreadable (no checksum or
    another one: damaged; any error from `read`: truncated, foreign, stale), then logged as "WHAT
    PATH is unreadable (...); AGAIN" and deleted, never failing the run. An entry read is marked
    recently used (`trim` keeps it longest). Shared by every cache kept here: decoded splits,
    canvases, kept steps and states."""
    if not path.exists():
        return None
    try:
        _check_seal(path)
        out = read(path)
    except Exception as e:  # noqa: BLE001 -- whatever is wrong with a cache entry, it is made afresh
        logger.warning("%s %s is unreadable (%s); %s", what, path, e, again)
        try:
            path.unlink(missing_ok=True)
        except OSError:  # a read-only cache: still made afresh, just not replaced
            pass
        return None
    try:
        os.utime(path)  # recently used: kept longest
    except OSError:  # a read-only cache is still read
        pass
    return out


def write_entry(path: Path, write, limit: int, failure: str, *, size: int, limit_name: str = "") -> bool:
    """write(binary file) into the cache entry `path` atomically (`fcn.staging.write_atomic`), followed by the
    checksum of what it wrote (what `read_entry` checks), then trims its
    folder's entries (same suffix) to `limit` bytes. False where the disk refused, logged as
    "FAILURE in FOLDER (...)": the next run makes the entry again, nothing else is lost. An entry
    of `size` bytes over `limit` (`limit_name` in the log: the setting that set it) is not written:
    the trim would delete it at once (and the folder's other entries with it), and every run would
    write it again."""
    if size > limit:
        limit_name = limit_name or f"its folder's limit ({limit >> 20} MiB)"
        logger.info("%s: %.0f MiB is over %s", failure, size / 2**20, limit_name)
        return False

    def sealed(tmp: Path) -> None:
        with open(tmp, "w+b") as f:
            write(f)
            f.flush()
            end = f.tell()
            crc = _crc32(f, end)  # read back from the page cache: any writer (np.save, tofile) will do
            f.seek(end)
            f.write(_SEAL + crc.to_bytes(4, "big"))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, sealed)
    except OSError as e:
        logger.warning("%s in %s (%s)", failure, path.parent, e)
        return False
    trim(path.parent, limit, path.suffix)
    return True


def payload_bytes(path: Path) -> int:
    """How many bytes of the entry `path` are its contents (before its checksum)."""
    return path.stat().st_size - _SEAL_BYTES


def _crc32(f, end: int) -> int:
    """CRC-32 of the first `end` bytes of the binary file `f`, read in pieces into one buffer."""
    f.seek(0)
    crc, buf = 0, memoryview(bytearray(1 << 20))
    while end > 0:
        n = f.readinto(buf[: min(end, len(buf))])
        if not n:
            raise ValueError("shorter than its checksum says")
        crc, end = zlib.crc32(buf[:n], crc), end - n
    return crc


def _check_seal(path: Path) -> None:
    """Raises ValueError unless `path` ends with the checksum of its contents (`write_entry`)."""
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size - _SEAL_BYTES
        if end < 0:
            raise ValueError("too short to carry its checksum")
        f.seek(end)
        seal = f.read(_SEAL_BYTES)
        if seal[: len(_SEAL)] != _SEAL:
            raise ValueError("it carries no checksum")
        if _crc32(f, end) != int.from_bytes(seal[len(_SEAL) :], "big"):
            raise ValueError("its checksum does not match its contents")


def map_arrays(path: Path) -> list[np.ndarray]:
    """The .npy arrays stored one after the other in the entry `path` (up to its checksum),
    memory-mapped read-only."""
    arrays = []
    size = payload_bytes(path)
    with open(path, "rb") as f:
        while f.tell() < size:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(f)
            if fortran_order or dtype.hasobject:
                raise ValueError(f"array {len(arrays)}: not a plain C-ordered array")
            offset, nbytes = f.tell(), int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if offset + nbytes > size:
                raise ValueError(f"array {len(arrays)} ends past the end of the file")
            # np.memmap refuses empty arrays; a view keeps the mapping alive as a plain ndarray.
            arrays.append(
                np.memmap(path, dtype, "r", offset, shape).view(np.ndarray) if nbytes else np.empty(shape, dtype)
            )
            f.seek(offset + nbytes)
    return arrays


def save(key: str, split, desc: str) -> None:
    """Stores `split` under `key` (atomically), then trims the folder to its size limit."""
    shapes = np.array([lab.shape for lab in split.labels], np.int64).reshape(-1, 2)
    names = np.array(list(split.names), str)
    if save_arrays(key, [list(split.images), list(split.labels), shapes, names], desc):
        logger.info("%s: decoded split cached in %s (data.cache_decoded=False turns this off)", desc, decoded_dir())


def save_arrays(key: str, arrays, desc: str) -> bool:
    """Stores `arrays` under `key` (atomically; a list of uint8 arrays is stored as one flat
    array, without a concatenated copy in memory), then trims the folder to its size limit.
    False when the disk refused (logged): the next run decodes again, nothing else is lost."""

    def write(f) -> None:
        for a in arrays:
            if isinstance(a, list):
                _save_flat(f, a)
            else:
                np.save(f, a, allow_pickle=False)

    size, limit = sum(sum(np.size(b) for b in a) if isinstance(a, list) else a.nbytes for a in arrays), _limit_bytes()
    path = decoded_dir() / f"{key}{_SUFFIX}"
    limit_name = f"FCN_DECODED_CACHE_GB={limit / 2**30:g}"
    return write_entry(path, write, limit, f"{desc}: not cached", size=size, limit_name=limit_name)


def _save_flat(f, arrays) -> None:
    """The uint8 arrays, one after the other, as one flat .npy array."""
    total = sum(int(np.size(a)) for a in arrays)
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (total,)})
    for a in arrays:
        np.ascontiguousarray(a, np.uint8).tofile(f)


def trim(folder: Path, limit: int, suffix: str = _SUFFIX) -> None:
    """Deletes the least recently used entries (files ending in `suffix`) until the folder holds at
    most `limit` bytes."""
    entries = []
    for p in folder.glob(f"*{suffix}"):
        try:
            st = p.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= size
