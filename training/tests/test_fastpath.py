"""The inference fast path (issue 7): rewritten generators, memory plan, out-of-memory fallbacks, and the guard that
its outputs match the fp32 reference path on a real CT within stated tolerances."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from ct2mr.inference.fastpath import (DepthSplitConv3d, TrilinearUpsample2x, UpsampleConv3d, optimize_for_inference,
                            tune_cpu_allocator)
from ct2mr.inference.translate import InferenceSettings, MemoryPlan, _run_pass, plan_memory, translate_volume
from ct2mr.networks import build_generator
from ct2mr_testdata import LUNG_CT, need, run_ct2mr

CPU = torch.device("cpu")

#: Correctness guard, fp32 fast path vs the fp32 reference, on the [-1, 1] scale: summation order only.
FP32_MAX_ABS, FP32_MEAN_ABS = 1e-4, 1e-6
#: bf16 autocast (opt-in on CPUs, the GPU default) vs the fp32 reference, [-1, 1] scale. Measured on the chest CT
#: crop below with the default model: G(x) max 0.036 / mean 0.0016, F(G(x)) max 0.12 / mean 0.0013 (the round trip
#: compounds two bf16 passes); the bounds leave about 2x margin. 0.005 mean = 4 HU of the CT window.
BF16_MAX_ABS, BF16_MEAN_ABS = 0.25, 0.005


@pytest.mark.parametrize("padding_mode", ["replicate", "zeros", "reflect"])
@pytest.mark.parametrize("kernel, out_channels, bias", [(7, 1, True), (5, 3, False), (7, 2, True)])
def test_depth_split_convolution_equals_conv3d(padding_mode, kernel, out_channels, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(4, out_channels, kernel, padding=kernel // 2, padding_mode=padding_mode, bias=bias)
    x = torch.randn(2, 4, 11, 10, 9)
    with torch.inference_mode():
        expected, got = conv(x), DepthSplitConv3d(conv)(x)
    assert got.shape == expected.shape
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (1, 2, 1, 4, 3)])
def test_separable_upsampling_equals_pytorch_trilinear(shape):
    x = torch.randn(*shape)
    expected = nn.Upsample(scale_factor=2, mode="trilinear")(x)
    torch.testing.assert_close(TrilinearUpsample2x()(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape, bias", [((2, 4, 5, 6, 7), True), ((1, 3, 1, 4, 3), False)])
def test_upsampling_fused_into_the_convolution_equals_the_pair(shape, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(shape[1], 5, 3, padding=1, padding_mode="replicate", bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = conv(nn.Upsample(scale_factor=2, mode="trilinear")(x))
        got = UpsampleConv3d(conv)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="replicate"):
        UpsampleConv3d(nn.Conv3d(2, 2, 3, padding=1))  # zero padding of the up-sampled volume is another function


def test_depth_split_refuses_strided_convolution():
    with pytest.raises(ValueError, match="stride-1"):
        DepthSplitConv3d(nn.Conv3d(2, 1, 7, stride=2, padding=3))


@pytest.mark.parametrize("spec", [
    {"name": "resnet", "base_channels": 4, "n_blocks": 2},
    {"name": "resnet", "base_channels": 4, "n_blocks": 1, "norm": "batch"},
    {"name": "unet", "base_channels": 4, "depth": 3},
    {"name": "unetpp", "base_channels": 4, "depth": 3},
])
def test_optimized_generator_computes_the_same_function(spec):
    torch.manual_seed(0)
    net = build_generator(spec).eval()
    fast = optimize_for_inference(net, CPU)
    x = torch.rand(2, 1, 32, 32, 32) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), net(x), atol=1e-5, rtol=0)
    assert not any(isinstance(m, DepthSplitConv3d) for m in net.modules()), "the original must stay untouched"
    if spec["name"] == "resnet":  # its 7^3 output convolution (C_out = 1) and its resize-convolutions are rewritten
        assert any(isinstance(m, DepthSplitConv3d) for m in fast.modules())
        assert sum(isinstance(m, UpsampleConv3d) for m in fast.modules()) == 2
    assert all(not p.requires_grad for p in fast.parameters())


@pytest.fixture(scope="module")
def lung_crop() -> np.ndarray:
    """A (96, 160, 160) crop of the real chest CT on the 1 mm network grid, [-1, 1]: 4 windows of 96^3 per pass."""
    need(LUNG_CT)
    from ct2mr.preprocessing.pipeline import preprocess

    pre = preprocess(sitk.ReadImage(str(LUNG_CT)), "ct")
    return np.ascontiguousarray(pre.array[100:196, 100:260, 100:260])


@pytest.mark.slow
def test_fast_path_matches_the_fp32_reference_on_a_real_ct(lung_crop):
    """The correctness guard of issue 7, with the bundled default model."""
    from ct2mr.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(None)
    reference = translate_volume(lung_crop, checkpoint, settings=InferenceSettings(fast=False, precision="fp32",
                                                                                   device="cpu"))
    fast = translate_volume(lung_crop, checkpoint, settings=InferenceSettings(device="cpu"))
    assert fast[2]["fast"] and fast[2]["precision"] == "float32" and not reference[2]["fast"]
    for ref, got in zip(reference[:2], fast[:2]):
        diff = np.abs(got - ref)
        assert diff.max() <= FP32_MAX_ABS and diff.mean() <= FP32_MEAN_ABS, (diff.max(), diff.mean())
    bf16 = translate_volume(lung_crop, checkpoint, settings=InferenceSettings(device="cpu", precision="bf16"))
    assert bf16[2]["precision"] == "bfloat16"
    for ref, got in zip(reference[:2], bf16[:2]):
        diff = np.abs(got - ref)
        assert diff.max() <= BF16_MAX_ABS and diff.mean() <= BF16_MEAN_ABS, (diff.max(), diff.mean())
        assert diff.max() > 0  # bf16 really ran (otherwise the bounds prove nothing)


class _FailsAboveBatch(nn.Module):
    """A real network that runs out of memory (as CUDA would) when given more than ``limit`` windows at once."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.conv = nn.Conv3d(1, 1, 3, padding=1, padding_mode="replicate")
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return torch.tanh(self.conv(x))


def test_out_of_memory_halves_the_window_batch_and_says_so():
    torch.manual_seed(0)
    net = _FailsAboveBatch(limit=1)
    volume = torch.rand(1, 1, 40, 40, 40) * 2 - 1
    settings = InferenceSettings(roi_size=(16, 16, 16), overlap=0.25)
    plan = MemoryPlan(sw_batch_size=4, stitch_device=CPU)
    with pytest.warns(RuntimeWarning) as record:
        out = _run_pass(net, volume, settings, (16, 16, 16), CPU, torch.float32, plan, lambda f: None)
    messages = [str(w.message) for w in record]
    assert any("4 windows per pass; retrying with 2" in m for m in messages), messages
    assert any("2 windows per pass; retrying with 1" in m for m in messages), messages
    assert plan.sw_batch_size == 1 and net.batches[:2] == [4, 2]
    net.limit = 10
    expected = _run_pass(net, volume, settings, (16, 16, 16), CPU, torch.float32, MemoryPlan(1, CPU), lambda f: None)
    torch.testing.assert_close(out, expected)


def test_out_of_memory_with_nothing_left_to_shrink_is_a_clear_error():
    net = _FailsAboveBatch(limit=0)
    checkpoint = SimpleNamespace(G=net, F=net, inference={"roi_size": [16, 16, 16]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="Out of memory on cpu.*smaller --roi-size"):
            translate_volume(np.zeros((20, 20, 20), np.float32), checkpoint,
                             settings=InferenceSettings(device="cpu", fast=False))


def test_cpu_memory_plan_and_settings_validation():
    plan = plan_memory(nn.Identity(), (64, 64, 64), (32, 32, 32), CPU, torch.float32, InferenceSettings())
    assert plan.sw_batch_size == 1 and plan.stitch_device == CPU
    assert plan_memory(nn.Identity(), (64, 64, 64), (32, 32, 32), CPU, torch.float32,
                       InferenceSettings(sw_batch_size=3)).sw_batch_size == 3
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        InferenceSettings(gpu_memory_gb=0)
    with pytest.raises(ValueError, match="sw_batch_size"):
        InferenceSettings(sw_batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the plan is CPU-only without one)")
def test_cuda_memory_plan_keeps_within_the_cap_and_falls_back_to_cpu_stitching():
    device = torch.device("cuda")
    net = optimize_for_inference(build_generator({"name": "resnet", "base_channels": 8, "n_blocks": 2}), device)
    small = plan_memory(net, (64, 64, 64), (32, 32, 32), device, torch.bfloat16, InferenceSettings())
    assert small.stitch_device.type == "cuda" and small.sw_batch_size >= 1 and small.window_bytes > 0
    # a volume whose float32 buffers exceed a 1 GiB cap must be stitched in CPU memory
    capped = plan_memory(net, (512, 512, 512), (32, 32, 32), device, torch.bfloat16,
                         InferenceSettings(gpu_memory_gb=1.0))
    assert capped.stitch_device.type == "cpu", capped.reason


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_allocator_tuning_applies_once():
    assert tune_cpu_allocator() is True
    assert tune_cpu_allocator() is True


@pytest.mark.slow
def test_reference_path_flag_matches_the_fast_command(tmp_path, tiny_checkpoint):
    """`ct2mr translate --reference-path --precision fp32` (real subprocesses) vs the default fast path."""
    need(LUNG_CT)
    ct = sitk.ReadImage(str(LUNG_CT))[200:264, 200:264, 20:32]  # 64 x 64 x 12 voxels of the real chest CT
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    outputs = {}
    for name, extra in (("fast", []), ("reference", ["--reference-path", "--precision", "fp32"])):
        run_ct2mr("translate", str(tmp_path / "ct.nrrd"), "-o", str(tmp_path / name), "--model", str(tiny_checkpoint),
                  "--device", "cpu", "--progress", "none", *extra, check=True)
        outputs[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "synthetic_mr.nii.gz")))
    assert outputs["fast"].shape == outputs["reference"].shape == sitk.GetArrayViewFromImage(ct).shape
    assert np.abs(outputs["fast"] - outputs["reference"]).max() <= FP32_MAX_ABS
