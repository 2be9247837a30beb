"""Shared fixtures of the engine tests: a tiny checkpoint trained by a real `ct2mr train` run."""

from __future__ import annotations

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
