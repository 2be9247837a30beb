"""Reading volumes: HDF5 conventions (thesis section 4), medical formats, DICOM folders, 4D splitting, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.io.images import ImageReadError, SpacingWarning, list_images, read_image, read_volumes, write_image

from ct2mr_testdata import CARDIAC_MR_4D, DICOM_CT, LUNG_CT, THORAX_CT, need


def _h5(path, data, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("volume", data=data)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.mark.parametrize("key, value, expected_xyz", [
    ("spacing_zyx", (3.0, 2.0, 0.5), (0.5, 2.0, 3.0)),
    ("spacing", (2.5, 1.0, 0.7), (0.7, 1.0, 2.5)),
    ("spacing_xyz", (0.7, 1.0, 2.5), (0.7, 1.0, 2.5)),
])
def test_hdf5_spacing_attributes_are_read_in_the_arrays_order(tmp_path, key, value, expected_xyz):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (z, y, x)
    image = read_image(_h5(tmp_path / "v.h5", data, **{key: value}))
    assert image.GetSize() == (6, 5, 4)
    assert image.GetSpacing() == pytest.approx(expected_xyz)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), data)


def test_hdf5_without_spacing_warns_and_uses_1mm(tmp_path):
    path = _h5(tmp_path / "v.h5", np.zeros((4, 5, 6), np.float32))
    with pytest.warns(SpacingWarning, match="assuming 1 mm"):
        image = read_image(path)
    assert image.GetSpacing() == (1.0, 1.0, 1.0)


def test_hdf5_without_volume_dataset_says_what_is_expected(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("image", data=np.zeros((4, 4, 4)))
    with pytest.raises(ImageReadError, match="no dataset 'volume'.*image"):
        read_image(tmp_path / "v.h5")


def test_real_nifti_nrrd_and_dicom_series_are_read_with_geometry():
    need(THORAX_CT, LUNG_CT, DICOM_CT)
    assert read_image(THORAX_CT).GetSize() == (233, 167, 191)
    lung = read_image(LUNG_CT)
    assert lung.GetSize() == (512, 512, 61)
    assert lung.GetSpacing() == pytest.approx((0.6269531, 0.6269531, 5.0))
    dicom = read_image(DICOM_CT)
    assert dicom.GetSize() == (512, 512, 20)
    assert dicom.GetSpacing()[2] == pytest.approx(2.0, abs=0.01)


def test_mha_write_and_read_keep_geometry(tmp_path):
    image = sitk.Image(8, 9, 10, sitk.sitkFloat32)
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((1.0, -2.0, 3.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    for suffix in (".mha", ".nrrd", ".nii.gz"):
        back = read_image(write_image(image, tmp_path / f"v{suffix}"))
        assert back.GetSize() == image.GetSize()
        assert back.GetSpacing() == pytest.approx(image.GetSpacing())
        assert back.GetOrigin() == pytest.approx(image.GetOrigin())
        assert back.GetDirection() == pytest.approx(image.GetDirection())
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_4d_series_is_refused_by_read_image_and_split_by_read_volumes():
    need(CARDIAC_MR_4D)
    with pytest.raises(ImageReadError, match="4D series of 20 volumes"):
        read_image(CARDIAC_MR_4D)
    volumes = read_volumes(CARDIAC_MR_4D, select=[0, 7])
    assert [name for name, _ in volumes] == ["cardiac_cine_sax_20phases_4d_t000", "cardiac_cine_sax_20phases_4d_t007"]
    assert all(image.GetDimension() == 3 and image.GetSize() == (256, 256, 12) for _, image in volumes)
    with pytest.raises(ImageReadError, match="outside the 4D series"):
        read_volumes(CARDIAC_MR_4D, select=[20])


def test_bad_inputs_give_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.nii.gz").write_text("this is not an image")
    with pytest.raises(ImageReadError, match="could not be read as a medical image"):
        read_image(tmp_path / "notes.nii.gz")
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(ImageReadError, match="2D image"):
        read_image(tmp_path / "slice.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageReadError, match="holds no volume"):
        list_images(tmp_path / "empty")


def test_list_images_expands_folders_and_dicom_series():
    need(THORAX_CT, DICOM_CT)
    found = list_images(THORAX_CT.parent)
    assert DICOM_CT in found and THORAX_CT in found
    assert all(p.suffix != ".txt" for p in found)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_an_error_not_zeros(tmp_path, suffix):
    need(THORAX_CT)
    whole = tmp_path / f"whole{suffix}"
    sitk.WriteImage(sitk.RegionOfInterest(read_image(THORAX_CT), (64, 64, 32), (80, 50, 80)), str(whole))
    assert read_image(whole).GetSize() == (64, 64, 32)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])  # ITK alone would fill the rest with zeros
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(cut)
