"""Checkpoints: safetensors round trip, refusal of wrong kinds and pickles, the bundled default model."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ct2mr.models.checkpoint import (FORMAT, CheckpointError, default_model_path, load_checkpoint, read_metadata,
                              save_checkpoint, sha256sum)
from ct2mr.networks import build_generator
from ct2mr.preprocessing.pipeline import PreprocessingConfig

SPEC = {"name": "resnet", "base_channels": 2, "n_blocks": 1, "norm": "instance"}


def _save(path, **kwargs):
    torch.manual_seed(0)
    G, F = build_generator(SPEC), build_generator(SPEC)
    config = PreprocessingConfig(ct_window=(-700, 900), k=32)
    save_checkpoint(path, {"G": G, "F": F}, {"generator": SPEC, "discriminator": {}}, config,
                    {"roi_size": [96, 96, 96]}, {"name": "unit", "steps": 3}, **kwargs)
    return G, F, config


def test_round_trip_keeps_weights_architecture_and_preprocessing(tmp_path):
    G, F, config = _save(tmp_path / "m.safetensors")
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    for a, b in ((G, ckpt.G), (F, ckpt.F)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
    assert ckpt.preprocessing == config
    assert ckpt.inference["roi_size"] == [96, 96, 96]
    assert ckpt.name == "unit"
    assert ckpt.sha256 == sha256sum(tmp_path / "m.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))


def test_safetensors_of_another_kind_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a ct2mr CycleGAN checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_pickle_checkpoints_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="refused because loading them can run code"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_missing_checkpoints(tmp_path):
    _save(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_mismatching_architecture_is_refused(tmp_path):
    _save(tmp_path / "m.safetensors")
    meta = read_metadata(tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "m.safetensors"))
    bad = {k: json.dumps(v) if isinstance(v, dict) else v for k, v in meta.items()}
    bad["architecture"] = json.dumps({"generator": {**SPEC, "base_channels": 3}})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(CheckpointError, match="do not fit its architecture"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_bundled_default_model_loads_and_matches_its_checksum():
    path = default_model_path()
    meta = read_metadata(path)
    assert meta["format"] == FORMAT
    assert path.stat().st_size < 20 * 2**20
    ckpt = load_checkpoint()
    # v1.5 (issue 13): the thesis preprocessing with the lung-inclusive CT window its recipe records
    assert ckpt.training["steps"] > 0 and ckpt.preprocessing == PreprocessingConfig(ct_window=(-1000.0, 1000.0))
