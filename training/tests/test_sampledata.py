"""Demo data download: real HTTP on 127.0.0.1, checksum verified, nothing kept on a bad checksum, offline fallback."""

from __future__ import annotations

import hashlib

import pytest

from ct2mr.io.sampledata import ChecksumError, demo_ct, fetch


@pytest.fixture()
def server(http_server):
    """The local HTTP server of conftest.py, serving one file."""
    url, root = http_server
    (root / "volume.nrrd").write_bytes(b"NRRD0004\n" + bytes(range(256)) * 100)
    return url, root


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
