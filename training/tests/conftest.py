"""Shared fixtures of the engine tests: a tiny checkpoint trained by a real `ct2mr train` run, a local HTTP server."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from ct2mr_testdata import ABDOMEN_MR, HEART_CT, need, run_ct2mr


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint from a real (tiny) `ct2mr train` run on real shared CT and MR volumes."""
    need(HEART_CT, ABDOMEN_MR)
    out = tmp_path_factory.mktemp("tiny_run")
    run_ct2mr("train", "--ct", str(HEART_CT), "--mr", str(ABDOMEN_MR), "--out", str(out), "--steps", "2",
              "--patch-size", "32", "--width", "2", "--blocks", "1", "--progress", "none", check=True)
    return out / "model.safetensors"


@pytest.fixture()
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving the (empty) folder tmp_path/www; yields ``(base_url, folder)``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
