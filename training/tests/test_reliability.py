"""Nothing lost, nothing silently wrong (issue 15): verified writes, refused inputs, checks before the work.

Real files, real `ct2mr` subprocesses and real faults: a full tmpfs (mounted here when the machine allows it), a
file-size limit (RLIMIT_FSIZE, so that writes fail with EFBIG and SimpleITK's NIfTI writer prints "wrote only 0 of
... bytes" without raising), a read-only file system, a writer killed with SIGKILL, damaged checkpoints and run
folders. No mocks.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ct2mr.checks import (InputCheckError, ResourceCheckError, check_input_image, check_training_memory,
                          estimate_translation_bytes, expected_output_bytes, network_grid_zyx, prepare_output_dir)
from ct2mr.io.images import (OutputWriteError, atomic_path, output_mode, remove_stale_temps, verify_file, write_hdf5,
                      write_image, write_json)

from ct2mr_testdata import (ABDOMEN_CT, ABDOMEN_MR, CARDIAC_MR, DICOM_CT, HEART_CT, LUNG_CT, REPO, THORAX_CT, need)

OUTPUTS = ("synthetic_mr.nii.gz", "roundtrip_ct.nii.gz", "error_map.nii.gz")


# ---- helpers ----------------------------------------------------------------------------------------------------
def _crop(path: Path, size=(80, 80, 60)) -> Path:
    """A central crop of the real heart CT (1.5 mm, HU): 80x80x60 voxels -> 1.5 MB per float32 output."""
    need(HEART_CT)
    ct = sitk.ReadImage(str(HEART_CT))
    index = [(n - s) // 2 for n, s in zip(ct.GetSize(), size)]
    sitk.WriteImage(sitk.RegionOfInterest(ct, list(size), index), str(path))
    return path


def _ct2mr(*args: str, fsize: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ct2mr ARGS` as a subprocess; ``fsize`` sets its RLIMIT_FSIZE (largest file it may write, bytes)."""

    def limit() -> None:
        os.umask(0o022)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ct2mr", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env, preexec_fn=limit)


def _entries(folder: Path) -> list[str]:
    """Every name in a folder, hidden ones included (temporary files are hidden)."""
    return sorted(os.listdir(folder)) if folder.is_dir() else []


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    """Mount a real tmpfs of ``size`` at ``path``; skip the test with the reason when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(proc.stderr or proc.stdout).strip() or 'mount failed'}): the full "
                    "file system case needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- verified writes --------------------------------------------------------------------------------------------
SHORT_WRITE_SCRIPT = r"""
import json, os, resource, sys
import numpy as np, SimpleITK as sitk, torch
from ct2mr.io.images import write_image, write_hdf5, write_json, OutputWriteError
from ct2mr.models.checkpoint import save_checkpoint, save_training_state
from ct2mr.networks import build_generator
from ct2mr.preprocessing.pipeline import PreprocessingConfig
out = sys.argv[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
image = sitk.GetImageFromArray(np.random.default_rng(0).random((50, 50, 50), dtype=np.float32))
spec = {"name": "resnet", "base_channels": 8, "n_blocks": 2, "norm": "instance"}
G, F = build_generator(spec), build_generator(spec)
jobs = {
    "v.nii.gz": lambda p: write_image(image, p), "v.nii": lambda p: write_image(image, p),
    "v.nrrd": lambda p: write_image(image, p), "v.mha": lambda p: write_image(image, p),
    "v.h5": lambda p: write_hdf5(sitk.GetArrayFromImage(image), p),
    "v.json": lambda p: write_json(p, {"x": "y" * 200_000}),
    "m.safetensors": lambda p: save_checkpoint(p, {"G": G, "F": F}, {"generator": spec}, PreprocessingConfig()),
    "trainer.pt": lambda p: save_training_state(p, {"w": torch.ones(100_000)}),
}
result = {}
for name, job in jobs.items():
    try:
        job(os.path.join(out, name))
        result[name] = "written"
    except OutputWriteError as exc:
        result[name] = str(exc)
print(json.dumps(result))
"""


def test_short_writes_raise_and_leave_nothing_under_a_final_name(tmp_path):
    """RLIMIT_FSIZE makes every write past 100 kB fail (EFBIG); SimpleITK's NIfTI writer does not raise then."""
    proc = subprocess.run([sys.executable, "-c", SHORT_WRITE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "wrote only" in proc.stderr  # the writer's own complaint, which it does not raise
    for name, message in result.items():
        assert message != "written", name
        assert message.startswith(f"Could not write {name} in {tmp_path}") and "free of" in message, message
        assert "Nothing was left under the final name" in message
    assert "incomplete after writing" in result["v.nii.gz"]  # found by reading back the header and the gzip stream
    assert "file-size limit" in result["v.mha"] or "incomplete" in result["v.mha"]
    assert _entries(tmp_path) == []  # no final name, no temporary file


def test_written_files_are_read_back_and_get_the_users_mode(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32))
    previous = os.umask(0o027)
    try:
        paths = [write_image(image, tmp_path / "a.nii.gz"), write_image(image, tmp_path / "a.nrrd"),
                 write_hdf5(np.zeros((4, 5, 6)), tmp_path / "a.h5"), write_json(tmp_path / "a.json", {"a": 1})]
        assert output_mode() == 0o640
    finally:
        os.umask(previous)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path  # not mkstemp's 0600
        verify_file(path)
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes()[:-10])
    with pytest.raises(OSError, match="incomplete after writing"):
        verify_file(tmp_path / "cut.nii.gz")
    assert _entries(tmp_path) == ["a.h5", "a.json", "a.nii.gz", "a.nrrd", "cut.nii.gz"]


KILLED_WRITER = r"""
import os, signal, sys
from ct2mr.io.images import atomic_path
tmp = atomic_path(os.path.join(sys.argv[1], "synthetic_mr.nii.gz"))
tmp.write_bytes(b"half a volume")
os.kill(os.getpid(), signal.SIGKILL)
"""

LIVE_WRITER = r"""
import os, sys, time
from ct2mr.io.images import atomic_path
tmp = atomic_path(os.path.join(sys.argv[1], "roundtrip_ct.nii.gz"))
print(tmp.name, flush=True)
time.sleep(60)
"""


def test_temporary_files_of_a_killed_run_are_removed_by_the_next_one(tmp_path):
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (orphan,) = [name for name in _entries(tmp_path)]
    assert orphan.startswith(".synthetic_mr.nii.gz.ct2mr-") and orphan.endswith(".tmp.nii.gz")
    legacy = tmp_path / ".error_map.nii.gz.ab12cd_3.tmp.nii.gz"  # what ct2mr wrote before this change
    legacy.write_bytes(b"old")
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        live_name = live.stdout.readline().strip()
        removed = {p.name for p in remove_stale_temps(tmp_path)}
        assert removed == {orphan, legacy.name}
        assert _entries(tmp_path) == [live_name]  # a writer that still runs keeps its file
        created = prepare_output_dir(tmp_path)  # what every ct2mr run does first
        assert created is False and _entries(tmp_path) == [live_name]
    finally:
        live.kill()
        live.wait()
    assert {p.name for p in remove_stale_temps(tmp_path)} == {live_name}


# ---- checks before the work: the output folder --------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "proc", "read_only"])
def test_output_folder_problems_fail_before_any_work(tmp_path, where):
    need(HEART_CT)
    if where == "file":
        target = tmp_path / "afile"
        target.write_text("not a folder\n")
        expected = "is a file, not a folder"
    elif where == "proc":
        target, expected = Path("/proc/ct2mr_out"), "Cannot create the output folder"
    else:
        target, expected = tmp_path / "ro", "Read-only file system"
    with _tmpfs(target, "1m", read_only=True) if where == "read_only" else contextlib.nullcontext():
        start = time.perf_counter()
        proc = _ct2mr("translate", str(HEART_CT), "-o", str(target), "--progress", "none")
        seconds = time.perf_counter() - start
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert seconds < 60  # refused before reading and translating (a translation of this CT takes ~15 s alone)
    if where == "file":
        assert target.read_text() == "not a folder\n"


def test_single_translate_refuses_a_folder_that_holds_outputs(tmp_path):
    need(HEART_CT)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "synthetic_mr.nii.gz"
    mine.write_bytes(b"someone else's synthetic MR")
    mine.chmod(0o640)
    proc = _ct2mr("translate", str(HEART_CT), "-o", str(out), "--progress", "none")
    assert proc.returncode == 1
    assert "already holds synthetic_mr.nii.gz; pass --overwrite" in proc.stderr, proc.stderr
    assert mine.read_bytes() == b"someone else's synthetic MR" and stat.S_IMODE(mine.stat().st_mode) == 0o640
    assert _entries(out) == ["synthetic_mr.nii.gz"]


@pytest.mark.slow
def test_overwrite_replaces_outputs_with_the_users_mode(tmp_path):
    ct = _crop(tmp_path / "ct.nii.gz", (40, 40, 30))
    out = tmp_path / "out"
    out.mkdir()
    (out / "synthetic_mr.nii.gz").write_bytes(b"old")
    proc = _ct2mr("translate", str(ct), "-o", str(out), "--overwrite", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert _entries(out) == sorted(OUTPUTS)
    for name in OUTPUTS:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644  # umask 022, not 0600
        verify_file(out / name)


# ---- full disks and short writes, end to end --------------------------------------------------------------------
def test_a_full_tmpfs_is_refused_before_any_work(tmp_path):
    need(HEART_CT)
    with _tmpfs(tmp_path / "mnt", "1m") as mnt:
        proc = _ct2mr("translate", str(HEART_CT), "-o", str(mnt / "out"), "--progress", "none")
        assert proc.returncode == 1
        assert "Not enough free disk space" in proc.stderr and "free" in proc.stderr, proc.stderr
        assert _entries(mnt) == []  # the output folder it created is removed again


@pytest.mark.slow
def test_a_disk_that_fills_during_the_translation_gives_an_error_and_no_partial_file(tmp_path):
    """A real full file system at write time: the tmpfs is filled once the networks run (after the checks)."""
    ct = _crop(tmp_path / "ct.nii.gz")
    with _tmpfs(tmp_path / "mnt", "8m") as mnt:
        out = mnt / "out"
        proc = subprocess.Popen([sys.executable, "-m", "ct2mr", "translate", str(ct), "-o", str(out), "--progress",
                                 "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        events, filled = [], False
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if not filled and event.get("stage") == "G":  # the checks passed; the outputs are not written yet
                free = shutil.disk_usage(mnt).free
                (mnt / "filler").write_bytes(b"\0" * (free - 300_000))
                filled = True
        assert proc.wait(timeout=600) != 0
        stderr = proc.stderr.read()
        assert filled and "Could not write synthetic_mr.nii.gz" in stderr, stderr
        assert "wrote only" in stderr  # SimpleITK's short write, which it does not raise
        assert events[-1]["event"] == "error" and "free of" in events[-1]["message"]
        assert _entries(mnt) == ["filler"]  # no partial output, no temporary file, not even the output folder


@pytest.mark.slow
def test_a_file_size_limit_gives_an_error_and_no_partial_file(tmp_path):
    ct = _crop(tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    proc = _ct2mr("translate", str(ct), "-o", str(out), "--progress", "none", fsize=1_000_000)
    assert proc.returncode == 1
    assert "Could not write synthetic_mr.nii.gz" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_batch_failures_are_recorded_in_the_summary_and_leave_no_partial_file(tmp_path):
    folder = tmp_path / "cts"
    folder.mkdir()
    _crop(folder / "a.nii.gz")
    _crop(folder / "b.nii.gz", (70, 80, 60))
    out = tmp_path / "out"
    proc = _ct2mr("translate", str(folder), "-o", str(out), "--progress", "none", fsize=1_000_000)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads((out / "translate_summary.json").read_text())
    assert summary["counts"]["failed"] == 2 and summary["counts"]["pending"] == 0
    for case in summary["cases"]:
        assert case["status"] == "failed" and case["error"].startswith("Could not write"), case
        assert _entries(out / case["case"]) == []  # nothing under a final name, no temporary file
    assert "a (" in proc.stderr and "Could not write" in proc.stderr


# ---- inputs that are not CTs --------------------------------------------------------------------------------------
def _variant(tmp_path: Path, kind: str) -> Path:
    ct = sitk.ReadImage(str(_crop(tmp_path / "base.nii.gz", (40, 40, 30))))
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    spacing = None
    if kind == "constant":
        array[:] = 0
    elif kind == "tiny_spacing":
        spacing = (0.01, 0.01, 0.01)
    elif kind == "huge_spacing":
        spacing = (50.0, 50.0, 50.0)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    if spacing:
        image.SetSpacing(spacing)
    path = tmp_path / f"{kind}.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind, expected", [
    ("mr", "does not look like a CT in Hounsfield units"),
    ("constant", "it is a constant volume"),
    ("tiny_spacing", "0.01 mm is below 0.1 mm"),
    ("huge_spacing", "50 mm is above 20.0 mm"),
])
def test_inputs_that_are_not_usable_cts_are_refused_before_any_work(tmp_path, kind, expected):
    need(ABDOMEN_MR)
    path = ABDOMEN_MR if kind == "mr" else _variant(tmp_path, kind)
    out = tmp_path / "out"
    proc = _ct2mr("translate", str(path), "-o", str(out), "--progress", "none")
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert not out.exists()
    if kind in ("mr", "constant"):
        assert "--force" in proc.stderr


@pytest.mark.slow
def test_force_translates_a_volume_that_fails_the_ct_check(tmp_path):
    path = _variant(tmp_path, "constant")
    proc = _ct2mr("translate", str(path), "-o", str(tmp_path / "out"), "--force", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert "Going on because of --force" in proc.stderr and _entries(tmp_path / "out") == sorted(OUTPUTS)


def test_the_ct_check_on_every_shared_volume():
    need(THORAX_CT, HEART_CT, LUNG_CT, ABDOMEN_CT, DICOM_CT, CARDIAC_MR, ABDOMEN_MR)
    from ct2mr.io.images import read_image

    for path in (THORAX_CT, HEART_CT, LUNG_CT, ABDOMEN_CT, DICOM_CT):
        image = read_image(path)
        _, report = check_input_image(image, "ct", str(path))
        assert report.problems == [] and 0.5 < report.stats.low_fraction < 0.8, (path, report.to_dict())
        with pytest.raises(InputCheckError, match="given as an MR, is refused: .* it looks like a CT"):
            check_input_image(image, "mr", str(path))
    for path in (CARDIAC_MR, ABDOMEN_MR):
        image = read_image(path)
        with pytest.raises(InputCheckError, match="does not look like a CT"):
            check_input_image(image, "ct", str(path))
        _, report = check_input_image(image, "mr", str(path))
        assert report.problems == []
    # a crop inside the abdomen (no air, but fat) is still a CT
    crop = sitk.RegionOfInterest(sitk.ReadImage(str(ABDOMEN_CT)), [16, 16, 16], [40, 30, 40])
    assert check_input_image(crop, "ct", "crop")[1].problems == []


def test_nan_and_inf_voxels_are_counted_and_replaced_by_air(tmp_path):
    ct = sitk.ReadImage(str(_crop(tmp_path / "ct.nii.gz", (40, 40, 30))), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(ct)
    array[3, :10, :10] = np.nan
    array[4, 0, :5] = np.inf
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    with pytest.warns(RuntimeWarning, match=r"105 voxel\(s\) are not finite \(100 NaN, 5 infinite\).*-1024 HU"):
        fixed, report = check_input_image(image, "ct", "nan CT")
    out = sitk.GetArrayFromImage(fixed)
    assert report.nonfinite == 105 and np.isfinite(out).all()
    assert (out[3, :10, :10] == -1024).all() and fixed.GetSpacing() == image.GetSpacing()


def test_nan_voxels_of_a_nifti_file_are_seen_not_read_as_water(tmp_path):
    """ITK's NIfTI reader turns NaN into 0 (water in HU); read_image puts them back, translate reports them."""
    ct = sitk.ReadImage(str(_crop(tmp_path / "ct.nii.gz", (40, 40, 30))), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(ct)
    array[3, :10, :10] = np.nan
    array[4, 0, :5] = -np.inf
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(tmp_path / "nan.nii.gz"))
    assert np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nan.nii.gz")))).sum() == 0  # ITK alone
    from ct2mr.io.images import read_image

    back = sitk.GetArrayFromImage(read_image(tmp_path / "nan.nii.gz"))
    assert np.isnan(back).sum() == 100 and np.isneginf(back).sum() == 5
    np.testing.assert_array_equal(back[np.isfinite(back)], array[np.isfinite(array)])


# ---- checks before the work: memory and the network grid ----------------------------------------------------------
def test_network_grid_and_output_size_are_known_before_resampling():
    need(LUNG_CT, CARDIAC_MR)
    from ct2mr.io.images import read_image
    from ct2mr.preprocessing.pipeline import preprocess

    for path, modality in ((LUNG_CT, "ct"), (CARDIAC_MR, "mr")):  # thick slices; oblique direction cosines
        image = read_image(path)
        _, padded = network_grid_zyx(image)
        assert tuple(padded) == preprocess(image, modality).array.shape
    lung = read_image(LUNG_CT)
    assert expected_output_bytes(lung) == 3 * 512 * 512 * 61 * 4 + 65536
    # the estimate of benchmarks/RESULTS.md's lung CT run (1.26 GiB measured peak RSS)
    assert 1.0 * 2**30 < estimate_translation_bytes(lung, network_grid_zyx(lung)[1], 8) < 1.6 * 2**30


def test_a_training_patch_too_large_for_the_memory_is_refused_with_one_that_fits(tmp_path):
    need(HEART_CT, ABDOMEN_MR)
    start = time.perf_counter()
    proc = _ct2mr("train", "--ct", str(HEART_CT), "--mr", str(ABDOMEN_MR), "--out", str(tmp_path / "run"),
                  "--patch-size", "256", "--steps", "1", "--progress", "none")
    assert proc.returncode == 1, proc.stderr
    assert "--patch-size 256 256 256 needs about" in proc.stderr and "The largest patch that fits is --patch-size" \
        in proc.stderr, proc.stderr
    assert time.perf_counter() - start < 120 and not (tmp_path / "run").exists()
    from ct2mr.training.config import load_config

    with pytest.raises(ResourceCheckError, match="largest patch that fits"):
        check_training_memory(load_config("m1", ["data.patch_size=[256,256,256]"]), "cpu")
    assert check_training_memory(load_config("m1", ["data.patch_size=[32,32,32]",
                                                    "model.generator.base_channels=8"]), "cpu").total_bytes < 2**31


@pytest.mark.parametrize("ct, mr, expected", [
    ("ABDOMEN_MR", "ABDOMEN_MR", "given both as CT and as MR"),
    ("CARDIAC_MR", "ABDOMEN_MR", "does not look like a CT in Hounsfield units"),
    ("HEART_CT", "ABDOMEN_CT", "given as an MR, is refused"),
])
def test_train_refuses_inputs_of_the_wrong_modality(tmp_path, ct, mr, expected):
    paths = {"ABDOMEN_MR": ABDOMEN_MR, "CARDIAC_MR": CARDIAC_MR, "HEART_CT": HEART_CT, "ABDOMEN_CT": ABDOMEN_CT}
    need(*paths.values())
    proc = _ct2mr("train", "--ct", str(paths[ct]), "--mr", str(paths[mr]), "--out", str(tmp_path / "run"),
                  "--steps", "1", "--patch-size", "32", "--width", "2", "--blocks", "1", "--progress", "none")
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


# ---- resume and models --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_corrupt_state_json_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    need(HEART_CT, ABDOMEN_MR)
    run = tmp_path / "run"
    tiny = ("--progress", "none", "--patch-size", "32", "--width", "2", "--blocks", "1")
    proc = _ct2mr("train", "--ct", str(HEART_CT), "--mr", str(ABDOMEN_MR), "--out", str(run), "--steps", "2",
                  "--checkpoint-every", "1", *tiny)
    assert proc.returncode == 0, proc.stderr
    (run / "state.json").write_text('{"step": 2, "dir": "checkp')  # cut by a crash of the disk, not of ct2mr
    proc = _ct2mr("train", "--out", str(run), "--resume", "train.steps=3", "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    assert f"{run / 'state.json'} is corrupt" in proc.stderr
    assert "falling back to the newest complete checkpoint folder" in proc.stderr and "step_00000002" in proc.stderr
    assert json.loads((run / "state.json").read_text())["step"] == 3
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 3 and steps == sorted(set(steps))  # continued from step 2, nothing logged twice
    shutil.rmtree(run / "checkpoints")
    (run / "state.json").write_text("garbage")
    proc = _ct2mr("train", "--out", str(run), "--resume", "train.steps=4", "--progress", "none")
    assert proc.returncode == 1 and "state.json is corrupt" in proc.stderr and "no complete checkpoint" in proc.stderr


def _damaged_default_model(tmp_path: Path, kind: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ct2mr.models.checkpoint import default_model_path

    source = default_model_path()
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(source))
    if kind == "missing":
        del tensors["G.model.10.body.0.weight"]
    elif kind == "shape":
        tensors["F.model.0.weight"] = tensors["F.model.0.weight"][:4].clone()
    else:
        metadata["inference"] = json.dumps({"roi_size": [0, 0, 0], "overlap": 0.25})
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("kind, expected", [
    ("missing", "1 tensor(s) of G are missing (e.g. G.model.10.body.0.weight)"),
    ("shape", "1 tensor(s) of F have the wrong shape (e.g. F.model.0.weight: [4, 1, 7, 7, 7] stored, [16, 1, 7, 7, 7] "
              "needed)"),
    ("roi", "its inference setting roi_size must be 1 or 3 positive multiples of 4 voxels, got [0, 0, 0]"),
])
def test_damaged_checkpoints_are_refused_by_models_import_and_translate(tmp_path, kind, expected):
    need(HEART_CT)
    model = _damaged_default_model(tmp_path, kind)
    env_cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "ct2mr", "models", "import", str(model), "--name", "bad",
                           "--version", "1"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "CT2MR_CACHE": str(env_cache), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert not (env_cache / "models" / "bad").exists()
    proc = _ct2mr("translate", str(HEART_CT), "-o", str(tmp_path / "out"), "--model", str(model), "--progress",
                  "none")
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_fp16_on_the_cpu_prints_a_note(tmp_path):
    """The note comes before the slow part; the run is stopped once it is seen."""
    ct = _crop(tmp_path / "ct.nii.gz", (40, 40, 30))
    proc = subprocess.Popen([sys.executable, "-m", "ct2mr", "translate", str(ct), "-o", str(tmp_path / "out"),
                             "--device", "cpu", "--precision", "fp16", "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    note = None
    try:
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "warning" and "fp16" in event["message"]:
                note = event["message"]
                break
    finally:
        proc.kill()
        proc.wait()
    assert note and "--precision fp16 on the CPU" in note and "fp32" in note


def test_a_checkpoint_writes_through_the_verified_helper(tmp_path):
    """save_checkpoint and save_training_state go through atomic_write: a read-only folder leaves nothing."""
    import torch

    from ct2mr.models.checkpoint import read_metadata, save_checkpoint, save_training_state
    from ct2mr.networks import build_generator
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    spec = {"name": "resnet", "base_channels": 2, "n_blocks": 1, "norm": "instance"}
    G, F = build_generator(spec), build_generator(spec)
    path = save_checkpoint(tmp_path / "m.safetensors", {"G": G, "F": F}, {"generator": spec}, PreprocessingConfig(),
                           {"roi_size": [48, 48, 48], "overlap": 0.5})
    verify_file(path)
    assert read_metadata(path)["inference"]["overlap"] == 0.5
    save_training_state(tmp_path / "t.pt", {"w": torch.ones(3)})
    verify_file(tmp_path / "t.pt")
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        with pytest.raises(OutputWriteError, match="Could not write m.safetensors"):
            save_checkpoint(ro / "m.safetensors", {"G": G, "F": F}, {"generator": spec}, PreprocessingConfig())
        assert _entries(ro) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert atomic_path(tmp_path / "x.json").name.startswith(".x.json.ct2mr-")
