"""`ct2mr qc`: Table 2, clipped voxels, the left-right orientation check and the figures (thesis 4.1, 4.3, App. B)."""

from __future__ import annotations

import csv
import statistics
import warnings

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.io.preprocessed import read_preprocessed
from ct2mr.preprocessing.batch import preprocess_batch
from ct2mr.cli import main
from ct2mr.io.images import read_image
from ct2mr.preprocessing.orientation import SideIndicator, check_orientation, heart_side
from ct2mr.preprocessing.pipeline import FlatVolumeWarning, PreprocessingConfig
from ct2mr.evaluation.qc import TABLE2_COLUMNS, find_preprocessed, run_qc

from ct2mr_testdata import ABDOMEN_MR, CARDIAC_MR, THORAX_CT, need

# 2 mm instead of 1 mm keeps these tests fast; the orientation indicator and the statistics do not depend on it
FAST = PreprocessingConfig(target_spacing=2.0)


def mirrored(image: sitk.Image) -> sitk.Image:
    """The same voxels with the physical space mirrored left-right (x -> -x in LPS) through the direction cosines."""
    out = sitk.Image(image)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    out.SetDirection(tuple((np.diag([-1.0, 1.0, 1.0]) @ direction).ravel()))
    origin = list(image.GetOrigin())
    origin[0] = -origin[0]
    out.SetOrigin(origin)
    return out


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    need(THORAX_CT, CARDIAC_MR, ABDOMEN_MR)
    root = tmp_path_factory.mktemp("qc")
    sources = root / "sources"
    sources.mkdir()
    flipped = sources / "thorax_flipped.nii.gz"
    sitk.WriteImage(mirrored(read_image(THORAX_CT)), str(flipped))
    with h5py.File(sources / "flat_mr.h5", "w") as f:
        f.create_dataset("volume", data=np.full((10, 20, 20), 3.0, np.float32))
        f.attrs["spacing"] = (2.0, 2.0, 2.0)
    ct = preprocess_batch([THORAX_CT, flipped], root / "ct", "ct", FAST, jobs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatVolumeWarning)
        mr = preprocess_batch([CARDIAC_MR, ABDOMEN_MR, sources / "flat_mr.h5"], root / "mr", "mr", FAST, jobs=2)
    assert not ct.failed and not mr.failed
    report = run_qc([root / "ct", root / "mr"], root / "qc")
    return {"root": root, "flipped": flipped, "report": report}


def test_a_left_right_flipped_ct_is_caught(collections):
    ct_dir = collections["root"] / "ct"
    normal = read_preprocessed(ct_dir / "thorax_cta_1p5mm.h5")
    flipped = read_preprocessed(ct_dir / "thorax_flipped.h5")
    a, b = heart_side(normal.array, normal.record), heart_side(flipped.array, flipped.record)
    assert a.side == "left" and a.offset_mm < -5 and a.agreement > 0.7 and a.slices >= 30
    assert b.side == "right" and b.offset_mm == pytest.approx(-a.offset_mm, abs=0.5)
    report = collections["report"].orientation
    assert [(label, name) for label, name, _ in report.flagged_volumes] == [("CT", "thorax_flipped")]
    assert "possible left-right flip" in report.flagged_volumes[0][2]
    assert report.votes["CT"] == {"left": 1, "right": 1, "indeterminate": 0}
    assert "FLAGGED CT thorax_flipped" in collections["report"].markdown
    # a whole collection flipped against the other modality's majority is flagged, the other one is not
    unsure = SideIndicator("indeterminate", None, None, 0, "abdomen")
    between = check_orientation({"CT": [("thorax", a)], "MRI": [("mirrored", b), ("other", b), ("unsure", unsure)]})
    assert set(between.flagged_collections) == {"MRI"}
    assert "unlike the majority of CT" in between.flagged_collections["MRI"]
    assert between.majority == {"CT": "left", "MRI": "right"} and not between.ok
    assert check_orientation({"CT": [("thorax", a)], "MRI": [("unsure", unsure)]}).ok


def test_unreliable_volumes_are_indeterminate_rather_than_flagged(collections):
    by_name = {v.name: v for v in collections["report"].volumes}
    assert by_name["flat_mr"].side == SideIndicator("indeterminate", None, None, 0, "flat volume")
    # the cardiac short-axis cine is centred on the heart (circular field of view, coil shading): slices disagree
    cardiac = by_name["cardiac_cine_sax_phase01"].side
    assert cardiac.side == "indeterminate" and cardiac.agreement < 0.65 and "agree" in cardiac.reason
    assert "MRI" not in collections["report"].orientation.flagged_collections


def test_table2_and_clipped_voxels_match_the_stored_records(collections):
    report = collections["report"]
    rows = {row.modality: row for row in report.rows}
    attrs = {v.name: read_preprocessed(v.path, load_array=False).attrs for v in report.volumes}
    ct_names, mr_names = ["thorax_cta_1p5mm", "thorax_flipped"], ["cardiac_cine_sax_phase01", "upper_abdomen_mr_3mm"]
    ct = rows["CT"]
    assert ct.cells()[:6] == ["CT", "—", "—", "—", "—", "0/2"]
    clipped = sum(attrs[n]["clipped_low"] + attrs[n]["clipped_high"] for n in ct_names)
    assert ct.clipped_percent == pytest.approx(100 * clipped / sum(attrs[n]["voxels"] for n in ct_names))
    assert attrs["thorax_cta_1p5mm"]["clipped_low"] == attrs["thorax_flipped"]["clipped_low"] > 0
    mr = rows["MRI"]
    assert mr.cells()[:3] == ["MRI", "1.0", "99.0"] and mr.cells()[5] == "1/3"
    assert mr.median_p_low == statistics.median(attrs[n]["intensity_range"][0] for n in mr_names)
    assert mr.median_p_high == statistics.median(attrs[n]["intensity_range"][1] for n in mr_names)
    high = sum(attrs[n]["clipped_high"] for n in mr_names)
    voxels = sum(attrs[n]["voxels"] for n in mr_names)
    assert mr.clipped_high_percent == pytest.approx(100 * high / voxels) and 0.5 < mr.clipped_high_percent < 1.01
    out = report.out_dir
    with open(out / "table2.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == TABLE2_COLUMNS and table[1:] == [ct.cells(), mr.cells()]
    markdown = (out / "table2.md").read_text()
    assert "| Modality | Clip low (%) | Clip high (%) | Median P1 | Median P99 | Flagged volumes |" in markdown
    assert "| MRI | 1.0 | 99.0 |" in markdown and "| 1/3 |" in markdown
    with open(out / "volumes.csv", newline="") as f:
        volumes = list(csv.DictReader(f))
    assert {v["name"]: v["heart_side"] for v in volumes}["thorax_flipped"] == "right"


def test_figures_are_written_and_the_raw_view_needs_a_reachable_source(collections, tmp_path):
    report = collections["report"]
    for modality in ("ct", "mr"):
        for kind in ("triplanar", "histogram_raw", "histogram_preprocessed"):
            path = report.out_dir / f"{modality}_{kind}.png"
            assert path in report.files and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not reachable" not in report.markdown
    collections["flipped"].unlink()
    again = run_qc(collections["root"] / "ct", tmp_path, examples=["thorax_flipped"])
    assert "raw source" in again.markdown and "not reachable" in again.markdown
    assert (tmp_path / "ct_triplanar.png").exists() and not (tmp_path / "mr_triplanar.png").exists()


def test_cli_qc_prints_table2_and_refuses_unknown_examples(collections, tmp_path, capsys):
    root = collections["root"]
    assert main(["qc", str(root / "ct"), str(root / "mr"), "--out", str(tmp_path), "--no-figures"]) == 0
    text = capsys.readouterr().out
    assert "| CT | — | — | — | — | 0/2 |" in text and "## Left-right orientation" in text
    assert not list(tmp_path.glob("*.png"))
    assert main(["qc", str(root / "ct"), "--out", str(tmp_path), "--example", "nope"]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No ct2mr preprocessing output"):
        find_preprocessed(tmp_path / "empty")
