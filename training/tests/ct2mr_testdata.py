"""Paths of the real volumes in ../shared/data and helpers shared by the engine tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("CT2MR_DATA", REPO.parent / "shared" / "data"))

THORAX_CT = DATA / "ct" / "thorax_cta_1p5mm.nii.gz"
HEART_CT = DATA / "ct" / "thorax_cta_heart_crop_1p5mm.nii.gz"
LUNG_CT = DATA / "ct" / "chest_ct_lung2.nrrd"
ABDOMEN_CT = DATA / "ct" / "abdomen_pelvis_ct_3mm.nii.gz"
DICOM_CT = DATA / "ct" / "upper_abdomen_ct_dicom"
CARDIAC_MR = DATA / "mr" / "cardiac_cine_sax_phase01.nii.gz"
CARDIAC_MR_4D = DATA / "mr" / "cardiac_cine_sax_20phases_4d.nii.gz"
ABDOMEN_MR = DATA / "mr" / "upper_abdomen_mr_3mm.nii.gz"


def need(*paths: Path) -> None:
    """Skip the calling test with a reason when a shared data file is absent."""
    for path in paths:
        if not path.exists():
            pytest.skip(f"shared data {path} is absent (expected ../shared/data beside the repository)")


def run_ct2mr(*args: str, check: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python -m ct2mr ARGS` as a real subprocess and return the completed process (text output)."""
    proc = subprocess.run([sys.executable, "-m", "ct2mr", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"ct2mr {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_on_grid(path: Path, reference) -> "np.ndarray":
    """Assert that the image at ``path`` lies on ``reference``'s voxel grid (size, spacing, origin, direction) and
    holds only finite values; return its (z, y, x) array."""
    import numpy as np
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == pytest.approx(reference.GetSpacing(), abs=1e-6)
    assert image.GetOrigin() == pytest.approx(reference.GetOrigin(), abs=1e-4)
    assert image.GetDirection() == pytest.approx(reference.GetDirection(), abs=1e-6)
    array = sitk.GetArrayFromImage(image)
    assert np.isfinite(array).all()
    return array
