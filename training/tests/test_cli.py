"""The `ct2mr` command end to end, as real subprocesses on real shared volumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import save_file

from ct2mr.inference.translate import OUTPUT_NAMES

from ct2mr_testdata import DICOM_CT, LUNG_CT, REPO, THORAX_CT, need, run_ct2mr


def _assert_on_input_grid(out_dir, reference: sitk.Image, ct_window=(-1000.0, 1000.0)) -> dict[str, np.ndarray]:
    """The outputs lie on ``reference``'s grid, finite, in range (``ct_window``: the default model v1.5's)."""
    arrays = {}
    for key, name in OUTPUT_NAMES.items():
        image = sitk.ReadImage(str(out_dir / name))
        assert image.GetSize() == reference.GetSize(), key
        assert image.GetSpacing() == pytest.approx(reference.GetSpacing(), abs=1e-6), key
        assert image.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-4), key
        assert image.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6), key
        arrays[key] = sitk.GetArrayFromImage(image)
        assert np.isfinite(arrays[key]).all(), key
    assert arrays["synthetic_mr"].min() >= -1 and arrays["synthetic_mr"].max() <= 1
    assert arrays["roundtrip_ct"].min() >= ct_window[0] - 1e-3 and arrays["roundtrip_ct"].max() <= ct_window[1] + 1e-3
    assert arrays["error_map"].min() >= 0
    return arrays


def test_help_explains_every_command():
    proc = run_ct2mr("--help", check=True)
    for word in ("translate", "train", "info"):
        assert word in proc.stdout
    proc = run_ct2mr("translate", "--help", check=True)
    assert "synthetic_mr.nii.gz" in proc.stdout and "--progress" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("ct", [THORAX_CT, LUNG_CT], ids=["thorax_cta_1p5mm", "chest_ct_lung2"])
def test_trained_checkpoint_translates_real_cts_onto_their_grid(tiny_checkpoint, ct, tmp_path):
    need(ct)
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(ct), "-o", str(out), "--model", str(tiny_checkpoint), "--progress", "json",
                     "--roi-size", "128", "--overlap", "0.1", check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    fractions = [e["fraction"] for e in events if e["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {e["stage"] for e in events if e["event"] == "progress"} == {"preprocess", "G", "F", "postprocess", "write"}
    assert set(events[-1]["outputs"]) == set(OUTPUT_NAMES)
    ct_image = sitk.ReadImage(str(ct))
    arrays = _assert_on_input_grid(out, ct_image)
    # error map is |F(G(x)) - clip(x)| in HU
    x = np.clip(sitk.GetArrayFromImage(ct_image).astype(np.float32), -600, 1000)
    np.testing.assert_allclose(arrays["error_map"], np.abs(arrays["roundtrip_ct"] - x), atol=1e-2)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES.values())


@pytest.mark.slow
def test_dicom_series_folder_translates(tiny_checkpoint, tmp_path):
    need(DICOM_CT)
    run_ct2mr("translate", str(DICOM_CT), "-o", str(tmp_path / "out"), "--model", str(tiny_checkpoint),
              "--progress", "none", "--roi-size", "128", check=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM_CT)))
    _assert_on_input_grid(tmp_path / "out", reader.Execute())


def _expect_clean_failure(tmp_path, *args, match):
    out = tmp_path / "out"
    proc = run_ct2mr("translate", *args, "-o", str(out), "--progress", "json")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and match in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["event"] == "error"
    assert not out.exists(), "no partial output"


def test_missing_file_fails_cleanly(tmp_path):
    _expect_clean_failure(tmp_path, str(tmp_path / "nothing.nii.gz"), match="No such file")


def test_2d_image_fails_cleanly(tmp_path):
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    _expect_clean_failure(tmp_path, str(tmp_path / "slice.nrrd"), match="2D image")


def test_non_image_fails_cleanly(tmp_path):
    (tmp_path / "report.nii.gz").write_text("not an image at all")
    _expect_clean_failure(tmp_path, str(tmp_path / "report.nii.gz"), match="could not be read as a medical image")


def test_checkpoint_of_the_wrong_kind_fails_cleanly(tmp_path):
    need(THORAX_CT)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "seg.safetensors"), metadata={"format": "monai"})
    _expect_clean_failure(tmp_path, str(THORAX_CT), "--model", str(tmp_path / "seg.safetensors"),
                          match="not a ct2mr CycleGAN checkpoint")


def test_train_refuses_unusable_inputs_clearly(tmp_path):
    proc = run_ct2mr("train", "--ct", str(tmp_path / "none"), "--mr", str(tmp_path), "--out", str(tmp_path / "run"),
                     "--steps", "1")
    assert proc.returncode == 1 and "No such file" in proc.stderr and "Traceback" not in proc.stderr


def test_train_writes_a_safe_checkpoint_with_every_preprocessing_parameter(tiny_checkpoint):
    proc = run_ct2mr("info", str(tiny_checkpoint), check=True)
    meta = json.loads(proc.stdout)
    assert meta["format"] == "ct2mr.cyclegan"
    assert meta["preprocessing"] == {"target_spacing": 1.0, "k": 16, "ct_window": [-600.0, 1000.0],
                                     "mr_percentiles": [1.0, 99.0], "orientation": "RAS", "flat_tolerance": 1e-06,
                                     "n4": False, "n4_shrink": 4, "n4_iterations": [50, 50, 30, 20]}
    assert meta["architecture"]["generator"]["name"] == "resnet"
    config = meta["training"]["config"]
    assert (config["model"]["lambda_cyc"], config["model"]["lambda_id"], config["train"]["lr_g"],
            config["train"]["betas"]) == (10.0, 0.2, 2e-4, [0.5, 0.999])
    assert meta["training"]["command"].startswith("ct2mr train")
    log = [json.loads(line) for line in (tiny_checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["cycle"])


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "ct2mr"
    assert script.exists(), "`make setup` installs the ct2mr console command into the virtual environment"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("ct2mr ")
