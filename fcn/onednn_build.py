"""Building fcn.onednn's handlers: compiled once, kept in the cache, old builds removed.

The handlers are compiled at first use with the C++ compiler (`$CXX`, else
g++) against jaxlib's FFI headers and the oneDNN of the pip packages
`onednn-cpu-gomp` and `onednn-devel-cpu-gomp` (or `$FCN_ONEDNN_ROOT`, a folder
with include/ and lib/), and kept in `<cache root>/ext/` (fcn.data.cache:
$FCN_CACHE_DIR, else $XDG_CACHE_HOME/fcn, else ~/.cache/fcn) as
`onednn_conv-<key>.so`, the key of the sources, jaxlib, the compiler and oneDNN,
so later processes only load it (the sources compile side by side, one compiler
process each, then link). Nothing is half-written: the library is compiled to a
temporary name (`*.tmp`) and renamed, so another process sees all of it or none.

Each change of the sources or toolchain makes a new key, and so a new library.
Whenever one is built or found, it is marked used (its mtime, at most once a
day), and fcn's libraries of other keys unused for a week are removed: a week,
not at once, so that environments sharing the cache (two checkouts, two venvs)
do not remove each other's and rebuild in turn (a build took 12.6 s on two
cores). A library that another process has loaded may be unlinked (Linux keeps
it mapped); one that goes between a process's finding and loading it is built
again. Another process's temporary files are left alone; those of builds
killed over an hour before are removed. Nothing else in the folder is touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "onednn_conv.cc", CSRC / "onednn_bn.cc")  # with CSRC / "onednn_common.h"
_LIB = "libdnnl.so.3"


class Unavailable(Exception):
    """Why the handlers cannot be built here (fcn.onednn.unavailable_reason())."""


def onednn_root() -> Path:
    """The folder whose include/ has oneDNN's headers and lib/ its library."""
    candidates = [os.environ["FCN_ONEDNN_ROOT"]] if os.environ.get("FCN_ONEDNN_ROOT") else [sys.prefix]
    for root in map(Path, candidates):
        if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").is_file() and (root / "lib" / _LIB).is_file():
            return root
    raise Unavailable(
        f"no oneDNN under {', '.join(candidates)} (include/oneapi/dnnl/dnnl.hpp and lib/{_LIB}): "
        "pip install onednn-cpu-gomp onednn-devel-cpu-gomp, or set FCN_ONEDNN_ROOT"
    )


def build(root: Path) -> Path:
    """The compiled handlers for oneDNN at `root`: from the cache, else compiled into it."""
    from fcn.data.cache import cache_root

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise Unavailable("no C++ compiler (g++, c++ or $CXX) to build the oneDNN convolutions")
    lib = root / "lib" / _LIB
    st = lib.stat()
    key = hashlib.sha256()
    for source in sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h")]):
        key.update(source.read_bytes() + b"\0")
    parts = (jax.ffi.include_dir(), jax.__version__, cxx, lib.resolve(), st.st_size, st.st_mtime_ns)
    key.update("\0".join(map(str, parts)).encode())
    out = cache_root() / "ext" / f"onednn_conv-{key.hexdigest()[:20]}.so"
    if out.is_file():
        _remove_unused(out)
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".", suffix=".tmp")
    except OSError as e:
        raise Unavailable(f"cannot build the oneDNN convolutions in {out.parent}: {e}") from e
    os.close(fd)
    _remove_stale(out.parent)
    objs = [f"{tmp.removesuffix('.tmp')}.{src.stem}.o.tmp" for src in SOURCES]  # beside it, removed alike
    try:
        _compile(shlex.split(cxx), root, lib, objs, tmp)  # $CXX may carry a wrapper or flags ("ccache g++")
        os.replace(tmp, out)  # atomic: another process sees the whole library or none
    finally:
        for f in (tmp, *objs):
            if os.path.exists(f):
                os.unlink(f)
    _remove_unused(out)
    return out


def _compile(compiler: list[str], root: Path, lib: Path, objs: list[str], out: str) -> None:
    """Compile SOURCES side by side into `objs`, one compiler process each, then link them with oneDNN
    into `out`."""
    flags = ["-O2", "-std=c++17", "-fPIC", "-I", jax.ffi.include_dir(), "-I", str(root / "include")]
    steps = [([*compiler, *flags, "-c", str(src), "-o", obj], src.name) for src, obj in zip(SOURCES, objs)]
    logger.info("compiling the oneDNN convolutions (once): %s", "; ".join(" ".join(c) for c, _ in steps))
    try:
        running = [(subprocess.Popen(c, stderr=subprocess.PIPE, text=True), c, name) for c, name in steps]
    except OSError as e:
        raise Unavailable(f"cannot run the C++ compiler {compiler[0]!r}: {e}") from e
    errors = [(proc.communicate()[1], proc.returncode, c, name) for proc, c, name in running]  # wait for all
    for stderr, rc, cmd, name in errors:
        if rc != 0:
            raise Unavailable(f"compiling {name} failed ({' '.join(cmd)}):\n{stderr[-2000:]}")
    link = [*compiler, "-shared", *objs, "-o", out, str(lib), f"-Wl,-rpath,{lib.parent}"]
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode != 0:
        raise Unavailable(f"linking the oneDNN convolutions failed ({' '.join(link)}):\n{done.stderr[-2000:]}")


_LIBRARY = re.compile(r"onednn_conv-[0-9a-f]{20}\.so")  # a finished build's name (temporaries end in .tmp)
_DAY = 86400


def _remove_unused(library: Path, unused_s: float = 7 * _DAY) -> None:
    """Mark `library` used (its mtime, at most once a day: `os.utime`), and remove fcn's other libraries
    in its folder unused for `unused_s` (built from older sources or toolchains). Unlinking one that
    another process has loaded is safe; `available()` builds again if one goes before it loads it."""
    now = time.time()
    for f in library.parent.iterdir():
        if not _LIBRARY.fullmatch(f.name):
            continue  # a build's temporaries, or not fcn's
        try:
            age = now - f.stat().st_mtime
            if f.name == library.name:
                if age > _DAY:
                    os.utime(f)
            elif age > unused_s:
                f.unlink()
                logger.info("removed %s, a oneDNN library unused for %d days", f, age // _DAY)
        except OSError:
            pass  # gone, or not ours to touch (a read-only cache)


def _remove_stale(folder: Path, age_s: float = 3600) -> None:
    """Temporary files of builds that were killed (a live build renames or removes its own)."""
    for f in folder.glob("onednn_conv-*.tmp"):
        try:
            if time.time() - f.stat().st_mtime > age_s:
                f.unlink()
        except OSError:
            pass  # another process's, gone or not ours to remove
