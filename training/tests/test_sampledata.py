"""Demo data download: real HTTP on 127.0.0.1, checksum verified, nothing kept on a bad checksum, offline fallback."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest

from ct2mr.sampledata import ChecksumError, demo_ct, fetch


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "volume.nrrd").write_bytes(b"NRRD0004\n" + bytes(range(256)) * 100)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def test_download_with_good_checksum_lands_in_place(server, tmp_path):
    url, root = server
    sha = hashlib.sha256((root / "volume.nrrd").read_bytes()).hexdigest()
    seen = []
    path = fetch(f"{url}/volume.nrrd", sha, tmp_path / "cache" / "v.nrrd", progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == (root / "volume.nrrd").read_bytes()
    assert seen[-1][0] == seen[-1][1] == path.stat().st_size
    # second call: cached, no request needed (server gone)
    (root / "volume.nrrd").unlink()
    assert fetch(f"{url}/volume.nrrd", sha, path) == path


def test_download_with_bad_checksum_keeps_nothing(server, tmp_path):
    url, _ = server
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch(f"{url}/volume.nrrd", "0" * 64, tmp_path / "cache" / "v.nrrd")
    assert not list((tmp_path / "cache").iterdir())


def test_unreachable_server_falls_back_to_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CT2MR_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "local.nii.gz"
    local.write_bytes(b"x")
    path, how = demo_ct([tmp_path / "missing.nii.gz", local], offline=True)
    assert path == local and "fallback" in how
    with pytest.raises(FileNotFoundError, match="--input"):
        demo_ct([tmp_path / "missing.nii.gz"], offline=True)
