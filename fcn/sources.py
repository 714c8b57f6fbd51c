"""fcn's own source files (its .py files, and the .cc and .h of the oneDNN handlers), as they were when
this process imported fcn: fcn/__init__.py imports this module before any other of fcn's.

fcn.traced keys the programs it keeps by these files' contents, which describe the code in this
process only while the files are as they were here (`unchanged`): a notebook kept open across an
edit or a `git pull` runs the older code.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def files() -> list[Path]:
    """fcn's source files, in order."""
    return sorted(p for suffix in ("py", "cc", "h") for p in PACKAGE.rglob(f"*.{suffix}"))


def _stats() -> list:
    """[path, size, modification time] of each source file; a file gone as it is listed, [path]."""
    out = []
    for p in files():
        try:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p)])
    return out


_AT_IMPORT = _stats()


def unchanged() -> bool:
    """Whether fcn's source files are as they were when this process imported fcn (their sizes and
    modification times)."""
    return _stats() == _AT_IMPORT
