"""Label transfer (issue 8): labelled CTs -> synthetic-MR nnU-Net / MONAI datasets with the same labels."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.inference.translate import InferenceSettings
from ct2mr.inference.cluster import shard
from ct2mr.inference.labeltransfer import augment_synthetic_mr, pair_cases, synthesize_dataset
from ct2mr.io.nnunet import case_id, parse_label_names, validate_dataset_json, write_layout_index

from ct2mr_testdata import HEART_CT, THORAX_CT, need, run_ct2mr


def _labels_for(ct: sitk.Image) -> sitk.Image:
    """A label map made by thresholds: 1 = body (HU > -500), 2 = lung (HU < -400 inside the body's bounding rows)."""
    hu = sitk.GetArrayFromImage(ct)
    body = hu > -500
    rows = np.any(body, axis=(0, 2))
    lung = (hu < -400) & rows[None, :, None] & ~body
    lung[:, :, : hu.shape[2] // 10] = False
    lung[:, :, -hu.shape[2] // 10:] = False
    labels = np.zeros(hu.shape, np.uint8)
    labels[body] = 1
    labels[lung] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    return image


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """case01: the heart-crop CT with a .nii.gz label map; case02: a crop of the thorax CT with an .nrrd label map;
    case03: a label map on a wrong grid; case04: a CT without label map."""
    need(HEART_CT, THORAX_CT)
    root = tmp_path_factory.mktemp("labelled")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copyfile(HEART_CT, images / "case01.nii.gz")
    sitk.WriteImage(_labels_for(sitk.ReadImage(str(HEART_CT))), str(labels / "case01.nii.gz"))
    crop = sitk.ReadImage(str(THORAX_CT))[40:160, 30:140, 60:140]
    sitk.WriteImage(crop, str(images / "case02_0000.nii.gz"))
    sitk.WriteImage(_labels_for(crop), str(labels / "case02.nrrd"))
    sitk.WriteImage(crop[:60, :60, :40], str(images / "case03.nii.gz"))
    wrong = _labels_for(crop[:60, :60, :40])
    wrong.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(wrong, str(labels / "case03.nii.gz"))
    sitk.WriteImage(crop[:40, :40, :40], str(images / "case04.nii.gz"))
    return images, labels


def test_cases_pair_by_id_and_unmatched_files_are_reported(collection):
    images, labels = collection
    pairs, unmatched_images, unmatched_labels = pair_cases(images, labels)
    assert [c for c, _, _ in pairs] == ["case01", "case02", "case03"]
    assert [p.name for p in unmatched_images] == ["case04.nii.gz"] and unmatched_labels == []
    assert case_id("x/lung_007_0000.nii.gz") == "lung_007" and case_id("x/lung_007.nrrd") == "lung_007"


@pytest.mark.slow
def test_synthesize_dataset_end_to_end(collection, tiny_checkpoint, tmp_path):
    images, labels = collection
    out = tmp_path / "Dataset501_SynMR"
    proc = run_ct2mr("synthesize-dataset", "--images", str(images), "--labels", str(labels), "--out", str(out),
                     "--model", str(tiny_checkpoint), "--augment", "1", "--roi-size", "128", "--overlap", "0",
                     "--progress", "none")
    # case03's label map is on another grid: refused with a clear message, the others are written, exit status 1
    assert proc.returncode == 1, proc.stderr
    assert "failed case03: The label map is not on the CT's voxel grid: spacing" in proc.stdout
    assert "without a label map: case04.nii.gz" in proc.stdout

    data = json.loads((out / "dataset.json").read_text())
    assert validate_dataset_json(data, out) == []
    assert data["channel_names"] == {"0": "MR"} and data["numTraining"] == 4  # 2 cases + 1 augmentation each
    assert data["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    # labels: bit-identical for a .nii.gz input, voxel-identical for the .nrrd one; images on exactly the same grid
    assert (out / "labelsTr" / "case01.nii.gz").read_bytes() == (labels / "case01.nii.gz").read_bytes()
    for case, label_source in (("case01", labels / "case01.nii.gz"), ("case02", labels / "case02.nrrd"),
                               ("case02_aug1", labels / "case02.nrrd")):
        label = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        source = sitk.ReadImage(str(label_source))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(source))
        assert label.GetPixelID() == source.GetPixelID()
        image = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        assert image.GetSize() == label.GetSize()
        assert image.GetSpacing() == label.GetSpacing()
        assert image.GetOrigin() == label.GetOrigin()
        assert image.GetDirection() == label.GetDirection()
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "case02_0000.nii.gz")))
    augmented = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesTr" / "case02_aug1_0000.nii.gz")))
    assert np.abs(plain - augmented).mean() > 1e-3
    meta = json.loads((out / "ct2mr_dataset.json").read_text())
    assert meta["model"]["sha256"] and meta["model"]["name"] and meta["model"]["version"]
    assert meta["preprocessing"]["ct_window"] == [-600.0, 1000.0] and meta["ct2mr_version"]
    assert sorted(meta["cases"]) == ["case01", "case02"]

    # a rerun skips the finished cases and does not touch their files
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    report = synthesize_dataset(images, labels, out, tiny_checkpoint,
                                settings=InferenceSettings(roi_size=128, overlap=0.0), augment=1)
    assert {r.case: r.status for r in report.results} == {"case01": "skipped", "case02": "skipped",
                                                          "case03": "failed"}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes


def test_no_pairs_is_a_clear_error(tmp_path):
    need(HEART_CT)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copyfile(HEART_CT, tmp_path / "a" / "ct1.nii.gz")
    shutil.copyfile(HEART_CT, tmp_path / "b" / "other.nii.gz")
    proc = run_ct2mr("synthesize-dataset", "--images", str(tmp_path / "a"), "--labels", str(tmp_path / "b"),
                     "--out", str(tmp_path / "out"), "--progress", "none")
    assert proc.returncode == 1 and "No CT has a label map with the same case id" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_monai_datalist_is_readable_by_monai(tmp_path):
    from monai.data import load_decathlon_datalist

    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    path = write_layout_index(tmp_path, ["b", "a"], {"background": 0, "lung": 1}, "monai")
    items = load_decathlon_datalist(str(path), data_list_key="training", base_dir=str(tmp_path))
    assert [os.path.basename(i["image"]) for i in items] == ["a_0000.nii.gz", "b_0000.nii.gz"]
    assert [os.path.basename(i["label"]) for i in items] == ["a.nii.gz", "b.nii.gz"]


@pytest.mark.parametrize("source, values, expected", [
    (None, [0, 1, 2], {"background": 0, "label_1": 1, "label_2": 2}),
    ({"lung": 1, "body": 2}, [0, 1, 2], {"background": 0, "lung": 1, "body": 2}),
    ({"1": "lung", "0": "background"}, [0, 1], {"background": 0, "lung": 1}),
])
def test_label_names(source, values, expected):
    assert parse_label_names(source, values) == expected


def test_label_names_must_cover_every_value():
    with pytest.raises(ValueError, match=r"values \[3\]"):
        parse_label_names({"lung": 1}, [0, 1, 3])


def test_validator_catches_bad_dataset_json():
    problems = validate_dataset_json({"channel_names": {"1": "MR"}, "labels": {"lung": 1}, "file_ending": ".nrrd"})
    assert any("numTraining" in p for p in problems)
    assert any("channel_names" in p for p in problems)
    assert any("background" in p for p in problems)
    assert any("file_ending" in p for p in problems)


def test_augmentation_is_deterministic_and_stays_in_range():
    array = np.linspace(-1, 1, 16 * 16 * 16, dtype=np.float32).reshape(16, 16, 16)
    a, b, c = (augment_synthetic_mr(array, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and a.dtype == np.float32


def test_sharding_splits_cases_among_ranks():
    assert shard(list(range(5)), 0, 2) == [0, 2, 4] and shard(list(range(5)), 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="outside world size"):
        shard([1], 2, 2)
