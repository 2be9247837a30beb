"""`ct2mr preprocess`: the thesis's chain over collections (section 4), with exact records, reruns and failures."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import warnings

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.cli import main
from ct2mr.io.preprocessed import PREPROCESSED_ATTR, is_preprocessed, output_name, read_preprocessed
from ct2mr.preprocessing.batch import LOG_NAME, preprocess_batch
from ct2mr.provenance import git_commit
from ct2mr.preprocessing.collections import load_domain
from ct2mr.io.images import read_image
from ct2mr.preprocessing.pipeline import (FlatVolumeWarning, PreprocessingConfig, n4_bias_correction, reorient_to_ras,
                                 resample_isotropic, robust_background)

from ct2mr_testdata import (ABDOMEN_CT, ABDOMEN_MR, CARDIAC_MR_4D, DICOM_CT, HEART_CT, LUNG_CT, REPO, need,
                            run_ct2mr)


def _h5(path, data, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("volume", data=data)
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


@pytest.fixture(scope="module")
def ct_batch(tmp_path_factory):
    """One real CT batch (2 worker processes) over every input format, with one truncated file among them."""
    need(HEART_CT, ABDOMEN_CT, DICOM_CT)
    root = tmp_path_factory.mktemp("ct_batch")
    inputs = root / "inputs"
    inputs.mkdir()
    heart = read_image(HEART_CT)
    zyx = sitk.GetArrayFromImage(heart)
    _h5(inputs / "heart_h5_spacing.h5", zyx, spacing=(1.5, 1.5, 1.5))  # thesis convention: (z, y, x) in mm
    _h5(inputs / "heart_h5_no_spacing.h5", zyx)
    sitk.WriteImage(read_image(ABDOMEN_CT), str(inputs / "abdomen.mha"), True)
    sitk.WriteImage(heart, str(inputs / "heart.nrrd"), True)
    (inputs / "truncated.nii.gz").write_bytes(HEART_CT.read_bytes()[:300_000])
    out = root / "out"
    summary = preprocess_batch([inputs, HEART_CT, DICOM_CT], out, "ct", jobs=2, command="pytest")
    return {"root": root, "inputs": inputs, "out": out, "summary": summary}


def _by_name(summary):
    return {r.name: r for r in summary.results}


def test_every_input_format_is_written_while_the_truncated_file_fails_clearly(ct_batch):
    summary = ct_batch["summary"]
    results = _by_name(summary)
    assert set(results) == {"heart_h5_spacing", "heart_h5_no_spacing", "abdomen", "heart", "truncated",
                            "thorax_cta_heart_crop_1p5mm", "upper_abdomen_ct_dicom"}
    assert results["truncated"].status == "failed"
    assert "truncated" in results["truncated"].message and "Traceback" not in results["truncated"].message
    assert not (ct_batch["out"] / "truncated.h5").exists()
    assert [r.name for r in summary.failed] == ["truncated"]
    assert summary.count("ok") == 6
    assert "6 written, 0 up to date (skipped), 1 failed" in summary.text()
    assert "FAILED  truncated" in summary.text()
    for name, result in results.items():
        if name == "truncated":
            continue
        assert result.output == str(ct_batch["out"] / output_name(name)) and is_preprocessed(result.output)
    assert not [p for p in ct_batch["out"].iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries


def test_hdf5_spacing_convention_and_the_1mm_fallback_with_its_warning(ct_batch):
    results = _by_name(ct_batch["summary"])
    assert any("assuming 1 mm" in w for w in results["heart_h5_no_spacing"].warnings)
    assert not results["heart_h5_spacing"].warnings
    with_spacing = read_preprocessed(results["heart_h5_spacing"].output, load_array=False).record
    fallback = read_preprocessed(results["heart_h5_no_spacing"].output, load_array=False).record
    assert with_spacing.input_grid["spacing"] == [1.5, 1.5, 1.5]
    assert fallback.input_grid["spacing"] == [1.0, 1.0, 1.0]
    # n' = round(n * s / t): 122 x 102 x 112 voxels at 1.5 mm -> 183 x 153 x 168; at the assumed 1 mm unchanged
    assert with_spacing.resampled_grid["size"] == [183, 153, 168]
    assert fallback.resampled_grid["size"] == [122, 102, 112]
    # the real NIfTI of the same CT gives the same network volume as the HDF5 with the thesis's spacing attribute
    nifti = read_preprocessed(results["thorax_cta_heart_crop_1p5mm"].output)
    nrrd = read_preprocessed(results["heart"].output)
    h5 = read_preprocessed(results["heart_h5_spacing"].output)
    assert nifti.array.shape == nrrd.array.shape == h5.array.shape == (176, 160, 192)
    np.testing.assert_array_equal(nifti.array, nrrd.array)


def test_symmetric_padding_is_recorded_for_de_padding(ct_batch):
    for result in ct_batch["summary"].results:
        if result.status != "ok":
            continue
        stored = read_preprocessed(result.output)
        attrs, record, array = stored.attrs, stored.record, stored.array
        before, after = np.array(attrs["pad_before_zyx"]), np.array(attrs["pad_after_zyx"])
        resampled_zyx = np.array(record.resampled_grid["size"][::-1])
        assert list(array.shape) == attrs["shape"] == list(resampled_zyx + before + after)
        assert all(n % 16 == 0 for n in array.shape)
        assert set(after - before) <= {0, 1}  # symmetric; an odd extra voxel goes after
        assert list(before) == [int((n // -16 * -16 - n) // 2) for n in resampled_zyx]
        # the padding holds the volume's minimum: for these CTs below -600 HU, so -1 after normalisation
        assert record.pad_value <= record.intensity_range[0]
        padded_region = np.ones(array.shape, bool)
        padded_region[tuple(slice(b, b + n) for b, n in zip(before, resampled_zyx))] = False
        assert np.all(array[padded_region] == -1.0)
        # read back with the thesis's HDF5 conventions, the file sits exactly on the padded RAS grid
        image = read_image(result.output)
        assert list(image.GetSize()) == record.padded_grid["size"]
        assert image.GetSpacing() == pytest.approx(record.padded_grid["spacing"])
        assert image.GetOrigin() == pytest.approx(record.padded_grid["origin"])
        assert image.GetDirection() == pytest.approx(record.padded_grid["direction"])


def test_every_attribute_of_the_thesis_output_format_is_stored(ct_batch):
    result = _by_name(ct_batch["summary"])["upper_abdomen_ct_dicom"]
    stored = read_preprocessed(result.output)
    attrs = stored.attrs
    assert stored.array.dtype == np.float32 and stored.array.min() >= -1 and stored.array.max() <= 1
    assert attrs[PREPROCESSED_ATTR] == 1 and attrs["modality"] == "ct" and attrs["name"] == "upper_abdomen_ct_dicom"
    assert attrs["source"] == str(DICOM_CT) and attrs["source_abspath"] == str(DICOM_CT.resolve())
    assert isinstance(attrs["identifiers"], dict)  # PatientID / UIDs when present (this series is anonymised)
    assert attrs["series_index"] == -1 and attrs["input_size"] == [512, 512, 20]
    assert attrs["spacing"] == [1.0, 1.0, 1.0] and len(attrs["direction"]) == 9 and len(attrs["origin"]) == 3
    assert (attrs["target_spacing"], attrs["k"], attrs["ct_window"]) == (1.0, 16, [-600.0, 1000.0])
    assert attrs["n4"] is False and attrs["flat"] is False
    config = PreprocessingConfig.from_dict(attrs["config"]["preprocessing"])
    assert config == PreprocessingConfig() and attrs["config"]["command"] == "pytest"
    assert stored.record.to_dict() == attrs["record"]
    assert attrs["voxels"] == 500 * 500 * 40
    assert attrs["clipped_low"] + attrs["clipped_high"] > 0
    assert sum(attrs["raw_histogram_counts"]) == 512 * 512 * 20 and len(attrs["raw_histogram_edges"]) == 129
    assert set(attrs["software_versions"]) == {"ct2mr", "python", "numpy", "SimpleITK", "h5py"}
    assert attrs["software_versions"]["SimpleITK"] == sitk.Version_VersionString()
    assert attrs["ct2mr_version"] == attrs["software_versions"]["ct2mr"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert attrs["git_commit"] == git_commit() and attrs["git_commit"].split("-")[0] == head
    stamp = dt.datetime.fromisoformat(attrs["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0) and abs(dt.datetime.now(dt.timezone.utc) - stamp).days < 1


def test_clipped_voxel_counts_are_exact(ct_batch):
    stored = read_preprocessed(_by_name(ct_batch["summary"])["abdomen"].output, load_array=False)
    image = read_image(stored.attrs["source"])
    resampled = sitk.GetArrayFromImage(resample_isotropic(reorient_to_ras(image), 1.0, robust_background(image)))
    assert stored.attrs["voxels"] == resampled.size
    assert stored.attrs["clipped_low"] == np.count_nonzero(resampled < -600)
    assert stored.attrs["clipped_high"] == np.count_nonzero(resampled > 1000)


def test_a_rerun_does_nothing_and_leaves_the_files_untouched(ct_batch):
    out = ct_batch["out"]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    log_lines = len((out / LOG_NAME).read_text().splitlines())
    again = preprocess_batch([ct_batch["inputs"], HEART_CT, DICOM_CT], out, "ct", jobs=2)
    statuses = {r.name: r.status for r in again.results}
    assert statuses.pop("truncated") == "failed"  # still reported, never silently skipped
    assert set(statuses.values()) == {"skipped"}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == before
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert len(log) == log_lines + 7 and {e["status"] for e in log[-7:]} == {"skipped", "failed"}


def test_changed_source_or_parameters_are_processed_again(tmp_path):
    need(HEART_CT)
    source = tmp_path / "heart.nii.gz"
    shutil.copy(HEART_CT, source)
    out = tmp_path / "out"
    assert preprocess_batch(source, out, "ct", jobs=1).results[0].status == "ok"
    assert preprocess_batch(source, out, "ct", jobs=1).results[0].status == "skipped"
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert preprocess_batch(source, out, "ct", jobs=1).results[0].status == "ok"
    result = preprocess_batch(source, out, "ct", PreprocessingConfig(k=32), jobs=1).results[0]
    assert result.status == "ok" and read_preprocessed(result.output).array.shape == (192, 160, 192)
    assert preprocess_batch(source, out, "ct", PreprocessingConfig(k=32), jobs=1, force=True).results[0].status == "ok"


def test_inputs_and_foreign_files_are_never_overwritten(tmp_path):
    need(HEART_CT)
    out = tmp_path / "out"
    first = preprocess_batch(HEART_CT, out, "ct", jobs=1).results[0]
    with pytest.raises(ValueError, match="would overwrite the input"):
        preprocess_batch(first.output, out, "ct", jobs=1)
    copy = tmp_path / "thorax_cta_heart_crop_1p5mm.nrrd"
    sitk.WriteImage(read_image(HEART_CT), str(copy))
    with pytest.raises(ValueError, match="would both write"):
        preprocess_batch([HEART_CT, copy], tmp_path / "out2", "ct", jobs=1)
    foreign = tmp_path / "out3" / "thorax_cta_heart_crop_1p5mm.h5"
    foreign.parent.mkdir()
    _h5(foreign, np.zeros((2, 2, 2), np.float32))
    result = preprocess_batch(HEART_CT, foreign.parent, "ct", jobs=1).results[0]
    assert result.status == "failed" and "not a ct2mr output" in result.message
    assert h5py.File(foreign, "r")["volume"].shape == (2, 2, 2)


@pytest.mark.parametrize("kwargs, match", [
    ({"modality": "pet"}, "modality must be one of"),
    ({"modality": "ct", "config": PreprocessingConfig(n4=True)}, "MR only"),
    ({"modality": "mr", "select": [-1]}, "select"),
    ({"modality": "mr", "jobs": 0}, "jobs"),
])
def test_bad_options_are_refused_up_front(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess_batch(tmp_path, tmp_path / "out", **kwargs)


def test_4d_series_are_split_with_select_and_a_bad_index_fails_alone(tmp_path):
    need(CARDIAC_MR_4D)
    summary = preprocess_batch(CARDIAC_MR_4D, tmp_path, "mr", select=[0, 19, 25], jobs=1)
    results = _by_name(summary)
    stem = "cardiac_cine_sax_20phases_4d"
    assert [r.status for r in summary.results] == ["ok", "ok", "failed"]
    assert "index 25 is outside the 4D series of 20 volumes" in results[f"{stem}_t025"].message
    first, last = (read_preprocessed(tmp_path / output_name(stem, t)) for t in (0, 19))
    assert (first.attrs["series_index"], last.attrs["series_index"], last.attrs["series_length"]) == (0, 19, 20)
    assert first.record.input_grid["size"] == [256, 256, 12]
    assert not np.array_equal(first.array, last.array)  # two cardiac phases, two volumes


def test_mr_percentiles_are_the_volumes_own_and_configurable(tmp_path):
    need(ABDOMEN_MR)
    config = PreprocessingConfig(mr_percentiles=(5.0, 95.0))
    result = preprocess_batch(ABDOMEN_MR, tmp_path, "mr", config, jobs=1).results[0]
    stored = read_preprocessed(result.output)
    image = read_image(ABDOMEN_MR)
    resampled = sitk.GetArrayFromImage(resample_isotropic(reorient_to_ras(image), 1.0, robust_background(image)))
    p5, p95 = np.percentile(resampled, [5.0, 95.0])
    assert stored.attrs["intensity_range"] == [float(p5), float(p95)]
    assert stored.attrs["mr_percentiles"] == [5.0, 95.0]
    assert stored.attrs["clipped_low"] == np.count_nonzero(resampled < p5)
    assert stored.attrs["clipped_high"] == np.count_nonzero(resampled > p95) <= 0.05 * resampled.size
    assert stored.array.min() == -1.0 and stored.array.max() == 1.0


def test_n4_on_the_abdominal_mr_lowers_the_bias_and_is_recorded(tmp_path):
    need(ABDOMEN_MR)
    image = read_image(ABDOMEN_MR)
    floats = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    corrected = sitk.GetArrayFromImage(n4_bias_correction(image))
    body = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1, 200)) > 0

    def cv(x):
        return float(x[body].std() / x[body].mean())

    assert cv(corrected) < 0.8 * cv(floats)  # 0.25 -> 0.15 on this volume: the smooth coil shading is removed
    plain = preprocess_batch(ABDOMEN_MR, tmp_path / "plain", "mr", jobs=1).results[0]
    n4 = preprocess_batch(ABDOMEN_MR, tmp_path / "n4", "mr", PreprocessingConfig(n4=True), jobs=1).results[0]
    a, b = read_preprocessed(plain.output), read_preprocessed(n4.output)
    assert b.attrs["n4"] is True and b.record.config["n4"] is True and a.attrs["n4"] is False
    assert a.array.shape == b.array.shape and np.abs(a.array - b.array).mean() > 0.05


def test_flat_mr_is_flagged_and_training_uses_preprocessed_files_as_they_are(ct_batch, tmp_path):
    flat = _h5(tmp_path / "flat_mr.h5", np.full((20, 30, 30), 7.0, np.float32), spacing=(2.0, 2.0, 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlatVolumeWarning)
        summary = preprocess_batch(flat, tmp_path / "mr", "mr", jobs=1)
    result = summary.results[0]
    assert result.status == "ok" and result.flat and any("flat" in w for w in result.warnings)
    assert "FLAGGED flat_mr" in summary.text()
    assert read_preprocessed(result.output).attrs["flat"] is True
    with pytest.raises(ValueError, match="No usable MR volume"):
        load_domain(tmp_path / "mr", "mr")  # the flagged volume is skipped
    out = ct_batch["out"]
    volumes = load_domain(out, "ct")
    assert len(volumes) == 6
    for volume in volumes:
        np.testing.assert_array_equal(volume.array, read_preprocessed(volume.source).array)  # not preprocessed twice
    with pytest.raises(ValueError, match="preprocessed as CT, not MR"):
        load_domain(out, "mr")


def test_cli_preprocess_reports_failures_with_exit_status_1(tmp_path):
    need(HEART_CT)
    (tmp_path / "broken.nii.gz").write_bytes(HEART_CT.read_bytes()[:200_000])
    out = tmp_path / "out"
    proc = run_ct2mr("preprocess", "--modality", "ct", str(HEART_CT), str(tmp_path / "broken.nii.gz"), "--out",
                     str(out), "--progress", "none", "--jobs", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "1 written, 0 up to date (skipped), 1 failed" in proc.stdout and "FAILED  broken" in proc.stdout
    assert (out / "thorax_cta_heart_crop_1p5mm.h5").exists()



def test_cli_preprocess_json_progress_one_line_errors_and_help(tmp_path, capsys):
    need(HEART_CT)
    out = tmp_path / "out"
    assert main(["preprocess", "--modality", "ct", str(HEART_CT), "--out", str(out), "--progress", "json"]) == 0
    assert main(["preprocess", "--modality", "ct", str(HEART_CT), "--out", str(out), "--progress", "json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["volume"]["status"] for e in lines if e["event"] == "progress"] == ["ok", "skipped"]
    done = lines[-1]
    assert (done["event"], done["ok"], done["skipped"], done["failed"]) == ("done", 0, 1, 0)
    assert main(["preprocess", "--modality", "ct", "--n4", str(HEART_CT), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == ("ct2mr preprocess: error: N4 bias-field correction (n4) applies to MR "
                                               "only; drop it for --modality ct.")
    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    text = capsys.readouterr().out
    assert "--select" in text and "preprocess_log.jsonl" in text and "round(n * s / t)" in text


@pytest.mark.slow
def test_rounding_rule_on_the_thick_slice_ct_through_the_command(tmp_path):
    need(LUNG_CT)
    run_ct2mr("preprocess", "--modality", "ct", str(LUNG_CT), "--out", str(tmp_path), "--progress", "none",
              check=True)
    stored = read_preprocessed(tmp_path / "chest_ct_lung2.h5")
    # 512 x 512 x 61 voxels at 0.627 x 0.627 x 5 mm -> round(n * s / 1 mm) = 321 x 321 x 305, padded to 336 x 336 x 320
    assert stored.record.resampled_grid["size"] == [321, 321, 305]
    assert stored.attrs["shape"] == [320, 336, 336]
    assert stored.attrs["pad_before_zyx"] == [7, 7, 7] and stored.attrs["pad_after_zyx"] == [8, 8, 8]
    assert stored.record.default_value == float(sitk.GetArrayViewFromImage(read_image(LUNG_CT)).min())
