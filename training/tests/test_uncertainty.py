"""Uncertainty map (issue 16): test-time augmentation and ensembles, undone exactly, on the CT's grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2mr.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ct2mr.inference.translate import InferenceSettings
from ct2mr.preprocessing.pipeline import PreprocessingConfig, preprocess
from ct2mr.inference.uncertainty import (DEFAULT_TTA_PASSES, UNCERTAINTY_NAME, Augmentation, RunningStd, stage_weights,
                               tta_augmentations, tta_std)

from ct2mr_testdata import HEART_CT, THORAX_CT, need, run_ct2mr, assert_on_grid

FLIPS = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
SHIFTS = [(0, 0, 0), (1, 2, 3), (3, 1, 1), (2, 0, 1)]


@pytest.mark.parametrize("flip", FLIPS, ids=str)
@pytest.mark.parametrize("shift", SHIFTS, ids=str)
def test_augmentation_is_undone_exactly(flip, shift):
    volume = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    aug = Augmentation(flip, shift)
    moved = aug.apply(volume)
    assert moved.shape == tuple(n + s for n, s in zip(volume.shape, shift))
    np.testing.assert_array_equal(aug.undo(moved), volume)
    # the content really moved: the first voxel of the original sits at the shift (after the flips)
    flipped = np.flip(volume, flip) if flip else volume
    assert moved[shift] == flipped[0, 0, 0]
    if any(shift):  # edge padding repeats the border values
        assert moved[0, 0, 0] == flipped[0, 0, 0]


def test_augmentations_are_deterministic_and_never_stride_aligned():
    augs = tta_augmentations(7, 3, seed=0)
    assert augs == tta_augmentations(7, 3, seed=0)
    assert [a.flip for a in augs] == [(2,), (1,), (0,), (1, 2), (0, 2), (0, 1), (0, 1, 2)]
    assert all(1 <= s <= 3 for a in augs for s in a.shift)  # never 0 and never a multiple of the stride 4
    assert augs[0].describe().startswith("flip x, shift (")
    assert len(tta_augmentations()) == DEFAULT_TTA_PASSES
    assert all(a.shift == (0, 0, 0) for a in tta_augmentations(3, 0))


@pytest.mark.parametrize(("n", "shift", "message"), [(0, 3, ">= 1"), (-2, 3, ">= 1"), (2, -1, "max_shift")])
def test_bad_augmentation_settings_are_refused(n, shift, message):
    with pytest.raises(ValueError, match=message):
        tta_augmentations(n, shift)


def test_running_std_matches_numpy():
    rng = np.random.default_rng(3)
    stack = rng.normal(size=(6, 4, 5, 3)).astype(np.float32)
    running = RunningStd()
    for item in stack:
        running.add(item)
    np.testing.assert_allclose(running.std(), stack.std(axis=0), atol=1e-5)
    np.testing.assert_allclose(running.mean, stack.mean(axis=0), atol=1e-6)
    single = RunningStd()
    single.add(stack[0])
    assert not single.std().any()
    with pytest.raises(ValueError, match="shape"):
        running.add(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="no array"):
        RunningStd().std()


def test_stage_weights_sum_to_one_and_grow_with_the_passes():
    weights = stage_weights(4)
    assert list(weights) == ["preprocess", "G", "F", "postprocess", "uncertainty", "write"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights["uncertainty"] == pytest.approx(4 * weights["G"])
    assert stage_weights(8)["uncertainty"] > weights["uncertainty"]


def _toy_checkpoint(net: torch.nn.Module) -> Checkpoint:
    """A real Checkpoint object around a given network (G = F = net), for the real sliding-window path."""
    return Checkpoint(G=net, F=net, architecture={"generator": {}}, preprocessing=PreprocessingConfig(),
                      inference={"roi_size": [32, 32, 32]}, training={"name": "toy"})


class _Pointwise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(2 * x)


def _heart_crop() -> np.ndarray:
    need(HEART_CT)
    image = sitk.ReadImage(str(HEART_CT))[30:70, 30:70, 30:62]
    return preprocess(image, "ct").array


def test_tta_of_an_equivariant_network_is_zero_everywhere():
    """A per-voxel network commutes with every flip and shift: the undone predictions coincide exactly."""
    volume = _heart_crop()
    settings = InferenceSettings(device="cpu", precision="fp32", fast=False, roi_size=32, overlap=0.25)
    std, info = tta_std(volume, _toy_checkpoint(_Pointwise()), settings, n=3)
    assert std.shape == volume.shape and std.dtype == np.float32
    assert float(std.max()) < 1e-5
    assert info["extra_passes"] == 3 and info["predictions"] == 4 and info["transforms"][0] == "identity"
    assert "3 extra passes of G" in info["cost"]


def test_tta_of_a_network_that_is_not_flip_invariant_is_positive():
    """An asymmetric convolution (x-derivative) changes sign under the x flip: the spread is where x changes."""
    volume = _heart_crop()
    conv = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 0], conv.weight[0, 0, 1, 1, 2] = -1.0, 1.0
    # one window covers the volume, so the convolution's zero padding acts only at the volume's own x borders
    settings = InferenceSettings(device="cpu", precision="fp32", fast=False, roi_size=64, overlap=0.25)
    assert max(volume.shape) <= 64
    std, _ = tta_std(volume, _toy_checkpoint(conv.eval()), settings, n=1, max_shift=0)  # the x flip only
    gradient = np.zeros_like(volume)
    gradient[:, :, 1:-1] = volume[:, :, 2:] - volume[:, :, :-2]
    inner = (slice(2, -2),) * 3
    # G(x) = d/dx, flipped-and-undone G = -d/dx: the population std of {g, -g} is |g|
    np.testing.assert_allclose(std[inner], np.abs(gradient)[inner], atol=1e-4)
    assert float(std.max()) > 0.1


def test_tta_reuses_a_given_base_prediction():
    volume = _heart_crop()
    settings = InferenceSettings(device="cpu", precision="fp32", fast=False, roi_size=32, overlap=0.25)
    with pytest.raises(ValueError, match="base G"):
        tta_std(volume, _toy_checkpoint(_Pointwise()), settings, n=1, base=np.zeros((4, 4, 4), np.float32))


@pytest.fixture(scope="module")
def chest_crop(tmp_path_factory) -> Path:
    """A 96 x 96 x 60 mm crop of the real thorax CT (1.5 mm voxels), written as NIfTI."""
    need(THORAX_CT)
    path = tmp_path_factory.mktemp("crop") / "thorax_crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(THORAX_CT))[80:144, 50:114, 90:130], str(path))
    return path


def test_translate_writes_the_uncertainty_map_on_the_ct_grid(tiny_checkpoint, chest_crop, tmp_path):
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(chest_crop), "-o", str(out), "--model", str(tiny_checkpoint), "--uncertainty",
                     "tta", "--uncertainty-passes", "2", "--progress", "json", "--device", "cpu", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "done"
    assert done["outputs"]["uncertainty"] == str(out / UNCERTAINTY_NAME)
    info = done["uncertainty"]
    assert info["mode"] == "tta" and info["extra_passes"] == 2 and info["predictions"] == 3
    assert info["cost"].startswith("2 extra passes of G")
    assert 0 < info["body"]["mean"] <= info["body"]["p95"] <= info["body"]["max"] <= 1.0
    progress = [e for e in events if e["event"] == "progress"]
    assert "uncertainty" in {e["stage"] for e in progress}
    fractions = [e["fraction"] for e in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    ct = sitk.ReadImage(str(chest_crop))
    std = assert_on_grid(out / UNCERTAINTY_NAME, ct)
    assert std.min() >= 0 and std.max() > 0
    synthetic = assert_on_grid(out / "synthetic_mr.nii.gz", ct)
    assert synthetic.shape == std.shape


def test_translate_ensemble_of_two_models(tiny_checkpoint, chest_crop, tmp_path):
    checkpoint = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        for p in checkpoint.G.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    second = save_checkpoint(tmp_path / "second.safetensors", {"G": checkpoint.G, "F": checkpoint.F},
                             checkpoint.architecture, checkpoint.preprocessing, checkpoint.inference,
                             {**checkpoint.training, "name": "tiny-perturbed"})
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(chest_crop), "-o", str(out), "--model", str(tiny_checkpoint), "--model",
                     str(second), "--uncertainty", "ensemble", "--progress", "json", "--device", "cpu", check=True)
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["uncertainty"]["mode"] == "ensemble" and done["uncertainty"]["extra_passes"] == 1
    assert [m["name"] for m in done["uncertainty"]["models"]] == [checkpoint.name, "tiny-perturbed"]
    assert done["model"] == checkpoint.name  # the first model writes the outputs
    std = assert_on_grid(out / UNCERTAINTY_NAME, sitk.ReadImage(str(chest_crop)))
    assert std.max() > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--uncertainty", "ensemble"], "at least two models"),
    (["--uncertainty", "tta", "--uncertainty-passes", "0"], ">= 1"),
    (["--model", "{m}", "--model", "{m}"], "only used by --uncertainty ensemble"),
])
def test_bad_uncertainty_requests_fail_before_any_work(tiny_checkpoint, chest_crop, tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.replace("{m}", str(tiny_checkpoint)) for a in args]
    proc = run_ct2mr("translate", str(chest_crop), "-o", str(out), *args, "--progress", "none")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_batch_refuses_the_single_ct_trust_options(chest_crop, tmp_path):
    proc = run_ct2mr("translate", str(chest_crop), str(chest_crop), "-o", str(tmp_path / "out"), "--uncertainty",
                     "tta", "--progress", "none")
    assert proc.returncode == 1 and "one CT at a time" in proc.stderr


def test_help_states_the_cost():
    proc = run_ct2mr("translate", "--help", check=True)
    text = " ".join(proc.stdout.split())
    assert "COSTS N EXTRA PASSES OF G" in text and "--uncertainty-passes" in text and "--ood" in text
