"""`ct2mr translate` over folders, several paths and list files: resume, failures, shards, prefetch overlap.

Real small CT crops of a shared abdomen CT (3 mm, about 16^3 voxels, so one case takes about a second with the tiny
checkpoint), real `ct2mr` subprocesses, real torchrun.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from ct2mr.inference.translate import OUTPUT_NAMES, InferenceSettings
from ct2mr.inference.batch import (DONE_MARKER, SUMMARY_NAME, case_ids, collect_cases, is_single_input,
                                   read_list_file, translate_batch)

from ct2mr_testdata import ABDOMEN_CT, ABDOMEN_MR, DICOM_CT, HEART_CT, REPO, need, run_ct2mr
from test_cli import _assert_on_input_grid

#: (index, size) of the three crops, in voxels (x, y, z) of the 3 mm abdomen CT: three different grids.
CROPS = {"case_a": ((40, 30, 40), (16, 16, 16)), "case_b": ((60, 40, 50), (15, 17, 16)),
         "case_c": ((30, 50, 60), (17, 14, 15))}
FAST = ("--roi-size", "48", "--progress", "none")


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> Path:
    """A folder with three small real CT crops (NIfTI, int16 HU) on different grids."""
    need(ABDOMEN_CT)
    folder = tmp_path_factory.mktemp("crops") / "cts"
    folder.mkdir()
    ct = sitk.ReadImage(str(ABDOMEN_CT))
    for name, (index, size) in CROPS.items():
        sitk.WriteImage(sitk.RegionOfInterest(ct, size, index), str(folder / f"{name}.nii.gz"))
    return folder


def _translate(*args: str, env: dict | None = None, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ct2mr", "translate", *args, "--model", str(model), *FAST],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def _summary(path: Path) -> dict[str, dict]:
    return {case["case"]: case for case in json.loads(path.read_text())["cases"]}


def _assert_case_on_grid(case_dir: Path, ct_path: Path) -> None:
    _assert_on_input_grid(case_dir, sitk.ReadImage(str(ct_path)))
    marker = json.loads((case_dir / DONE_MARKER).read_text())
    assert marker["input"] == str(ct_path.resolve()) and marker["size"] == ct_path.stat().st_size
    assert len(marker["model_sha256"]) == 64 and marker["settings"]["roi_size"] == [48, 48, 48]


# --- without a model: how inputs become cases --------------------------------------------------------------------

def test_single_versus_batch_inputs(crops, tmp_path):
    need(DICOM_CT)
    assert is_single_input([str(crops / "case_a.nii.gz")])
    assert is_single_input([str(DICOM_CT)]), "a folder that is one DICOM series stays a single case"
    assert is_single_input([str(tmp_path / "missing.nii.gz")]), "left to translate_file to report"
    assert not is_single_input([str(crops)])
    assert not is_single_input([str(crops / "case_a.nii.gz"), str(crops / "case_b.nii.gz")])
    (tmp_path / "one.txt").write_text(str(crops / "case_a.nii.gz") + "\n")
    assert not is_single_input([str(tmp_path / "one.txt")]), "a list file is a batch, even of one"
    # a folder holding a DICOM series sub-folder and a file: two cases, the series is one of them
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "upper_abdomen").symlink_to(DICOM_CT, target_is_directory=True)
    shutil.copy(crops / "case_a.nii.gz", mixed / "case_a.nii.gz")
    cases = collect_cases([mixed])
    assert [(c.case_id, c.path.name, c.error) for c in cases] == [("case_a", "case_a.nii.gz", None),
                                                                  ("upper_abdomen", "upper_abdomen", None)]


@pytest.mark.parametrize("names, expected", [
    (["a/ct.nii.gz", "b/ct.nii.gz", "c/ct.nrrd"], ["ct", "ct_2", "ct_3"]),
    (["a/ct.nii.gz", "b/ct.nii.gz", "c/ct_2.nii.gz"], ["ct", "ct_3", "ct_2"]),  # never steal a name of its own
    (["x/lung.1.nrrd", "x/ct.v2.mha"], ["lung.1", "ct.v2"]),  # only the image suffix goes
])
def test_case_ids_are_unique_and_deterministic(names, expected):
    assert case_ids([Path(n) for n in names]) == expected


def test_list_files_resolve_relative_paths_and_skip_comments(crops, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    rel = os.path.relpath(crops / "case_b.nii.gz", lists)
    (lists / "cases.txt").write_text(f"# cohort A\n\n  {rel}  \n{crops / 'case_a.nii.gz'}\n")
    assert read_list_file(lists / "cases.txt") == [crops / "case_b.nii.gz", crops / "case_a.nii.gz"]
    (lists / "cases.csv").write_text(f"path,label\n{rel},1\n# skipped\n")
    assert read_list_file(lists / "cases.csv") == [crops / "case_b.nii.gz"]
    cases = collect_cases([lists / "cases.txt", crops / "case_a.nii.gz", tmp_path / "gone.nii.gz"])
    expected = sorted([crops / "case_a.nii.gz", crops / "case_b.nii.gz", tmp_path / "gone.nii.gz"], key=os.path.abspath)
    assert [c.path for c in cases] == expected, "sorted by absolute path, de-duplicated"
    gone = next(c for c in cases if c.case_id == "gone")
    assert gone.error and "No such file" in gone.error


# --- in process: prefetch overlap, marker-driven resume ----------------------------------------------------------

@pytest.mark.slow
def test_next_case_is_prepared_while_the_current_one_translates(tiny_checkpoint, crops, tmp_path):
    events = []
    settings = InferenceSettings(roi_size=48, device="cpu")
    two = [crops / "case_c.nii.gz", crops / "case_a.nii.gz"]
    run = translate_batch(two, tmp_path / "out", tiny_checkpoint, settings,
                          on_case=lambda i, n, r: events.append((i, n, r.case_id, r.status)))
    assert [r.status for r in run.results] == ["done", "done"] and run.summary.name == SUMMARY_NAME
    assert events == [(1, 2, "case_a", "running"), (1, 2, "case_a", "done"), (2, 2, "case_c", "running"),
                      (2, 2, "case_c", "done")]
    first, second = (r.timeline for r in run.results)
    assert second["prepare_start"] < first["translate_end"], "read + preprocess of the next CT overlaps G/F"
    assert first["prepare_end"] <= first["translate_start"]
    # resume: same inputs and settings skip; a touched input, other settings or overwrite recompute
    os.utime(crops / "case_a.nii.gz")
    again = translate_batch(two, tmp_path / "out", tiny_checkpoint, settings, prefetch=False)
    assert [r.status for r in again.results] == ["done", "skipped"]
    other = translate_batch(two[:1], tmp_path / "out", tiny_checkpoint,
                            InferenceSettings(roi_size=48, overlap=0.5, device="cpu"))
    assert [r.status for r in other.results] == ["done"]
    forced = translate_batch(two[1:], tmp_path / "out", tiny_checkpoint, settings, overwrite=True)
    assert [r.status for r in forced.results] == ["done"]


# --- real subprocesses ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_folder_batch_writes_each_case_on_its_grid_and_resumes(tiny_checkpoint, crops, tmp_path):
    out = tmp_path / "out"
    proc = _translate(str(crops), "-o", str(out), model=tiny_checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert "3 done, 0 skipped, 0 failed" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["case_a", "case_b", "case_c", SUMMARY_NAME]
    for case in CROPS:
        _assert_case_on_grid(out / case, crops / f"{case}.nii.gz")
    cases = _summary(out / SUMMARY_NAME)
    assert {c: v["status"] for c, v in cases.items()} == dict.fromkeys(CROPS, "done")
    assert all(v["seconds"] > 0 and v["error"] is None for v in cases.values())
    files = [p for p in out.rglob("*") if p.is_file() and p.name != SUMMARY_NAME]
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    proc = _translate(str(crops), "-o", str(out), model=tiny_checkpoint)
    assert proc.returncode == 0 and "0 done, 3 skipped" in proc.stdout, proc.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes, "a resumed batch rewrites nothing"
    assert {v["status"] for v in _summary(out / SUMMARY_NAME).values()} == {"skipped"}

    (out / "case_b" / "error_map.nii.gz").unlink()
    proc = _translate(str(crops), "-o", str(out), model=tiny_checkpoint)
    assert proc.returncode == 0, proc.stderr
    assert {c: v["status"] for c, v in _summary(out / SUMMARY_NAME).items()} == {
        "case_a": "skipped", "case_b": "done", "case_c": "skipped"}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.parent.name != "case_b")
    _assert_case_on_grid(out / "case_b", crops / "case_b.nii.gz")


@pytest.mark.slow
def test_list_file_with_a_corrupt_and_a_missing_input(tiny_checkpoint, crops, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "broken.nii.gz").write_text("not an image at all")
    rel = os.path.relpath(crops / "case_c.nii.gz", lists)
    (lists / "cases.lst").write_text(f"# two good, one corrupt, one missing\n{rel}\nbroken.nii.gz\n"
                                     f"{crops / 'case_a.nii.gz'}\nmissing.nrrd\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ct2mr", "translate", str(lists / "cases.lst"), "-o", str(out),
                           "--model", str(tiny_checkpoint), "--roi-size", "48", "--progress", "json"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert any("broken" in e and "could not be read" in e for e in errors)
    assert any("missing" in e and "No such file" in e for e in errors)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert (events[-1]["done"], events[-1]["failed"]) == (2, 2)
    finished = {e["case"]: e["status"] for e in events if e["event"] == "case" and e["status"] != "running"}
    assert finished == {"broken": "failed", "case_a": "done", "case_c": "done", "missing": "failed"}
    assert {e["stage"] for e in events if e["event"] == "progress"} == {"preprocess", "G", "F", "postprocess",
                                                                        "write"}
    assert sorted(p.name for p in out.iterdir()) == ["case_a", "case_c", SUMMARY_NAME], "no folder of a failure"
    _assert_case_on_grid(out / "case_c", crops / "case_c.nii.gz")


@pytest.mark.slow
def test_batch_reports_each_case_done_with_its_analysis(tmp_path):
    """What a front end (the Slicer module) loads per case from one batch process: a ``case_done`` event with the
    outputs, device, CT window and analysis, before the case's final ``case`` event; a rerun reports skipped cases
    the same way. The bundled default model, two small crops of a real CT (about 10 s on a CPU)."""
    need(HEART_CT, ABDOMEN_MR)
    ct = sitk.ReadImage(str(HEART_CT))
    sitk.WriteImage(ct[10:42, 10:42, 30:54], str(tmp_path / "a.nrrd"))
    sitk.WriteImage(ct[30:62, 20:52, 30:54], str(tmp_path / "b.nrrd"))
    (tmp_path / "cases.txt").write_text("b.nrrd\na.nrrd\n")
    out = tmp_path / "out"
    arguments = ("translate", str(tmp_path / "cases.txt"), "-o", str(out), "--device", "cpu", "--progress", "json",
                 "--analysis", "--reference-mr", str(ABDOMEN_MR))
    proc = run_ct2mr(*arguments, check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert (events[0]["event"], events[0]["mode"], events[-1]["event"], events[-1]["done"]) == ("start", "batch",
                                                                                                "done", 2)
    kinds = [(e["event"], e.get("case"), e.get("status")) for e in events if e["event"] in ("case", "case_done")]
    assert kinds == [("case", "a", "running"), ("case_done", "a", "done"), ("case", "a", "done"),
                     ("case", "b", "running"), ("case_done", "b", "done"), ("case", "b", "done")]
    stages = [e.get("stage") for e in events if e["event"] == "progress"]
    assert stages.count("analysis") >= 2 and stages.index("analysis") > stages.index("write")
    for done in (e for e in events if e["event"] == "case_done"):
        case_dir = out / done["case"]
        analysis = json.loads((case_dir / "analysis.json").read_text())
        assert done["output_dir"] == str(case_dir) and done["outputs"]["analysis"] == str(case_dir / "analysis.json")
        assert set(done["outputs"]) == {*OUTPUT_NAMES, "analysis"} and done["analysis"] == analysis
        assert done["device"] == "cpu" and done["ct_window"] == [-1000.0, 1000.0] and done["mean_error_hu"] > 0
        assert done["model"] and done["stage_seconds"]["G"] > 0 and done["anatomy"] is None
        assert analysis["error"] == "" and list(analysis["histogram"]["columns"]) == ["Synthetic MR", "Reference MR"]
        _assert_on_input_grid(case_dir, sitk.ReadImage(str(tmp_path / f"{done['case']}.nrrd")))
        marker = json.loads((case_dir / DONE_MARKER).read_text())
        assert marker["options"]["analysis"] is True and marker["outputs"]["analysis"] == "analysis.json"
    summary = _summary(out / SUMMARY_NAME)
    assert "info" not in summary["a"] and summary["a"]["outputs"]["analysis"] == str(out / "a" / "analysis.json")

    again = [json.loads(line) for line in run_ct2mr(*arguments, check=True).stdout.splitlines() if line[:1] == "{"]
    skipped = [e for e in again if e["event"] == "case_done"]
    assert [(e["case"], e["status"]) for e in skipped] == [("a", "skipped"), ("b", "skipped")]
    assert skipped[0]["outputs"]["analysis"] == str(out / "a" / "analysis.json")
    assert skipped[0]["ct_window"] == [-1000.0, 1000.0] and skipped[0]["analysis"] is None  # the default model v1.5


@pytest.mark.slow
def test_two_ranks_cover_the_list_exactly_once(tiny_checkpoint, crops, tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "ct2mr", "translate", str(crops), "-o", str(out), "--model",
                               str(tiny_checkpoint), *FAST], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
             for r in range(2)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    shards = [_summary(out / f"translate_summary.rank{r}.json") for r in range(2)]
    assert list(shards[0]) == ["case_a", "case_c"] and list(shards[1]) == ["case_b"]
    assert all(v["status"] == "done" for s in shards for v in s.values())
    assert not (out / SUMMARY_NAME).exists()
    for case in CROPS:
        _assert_case_on_grid(out / case, crops / f"{case}.nii.gz")


@pytest.mark.slow
def test_torchrun_shards_the_batch(tiny_checkpoint, crops, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "out"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "ct2mr", "translate",
                           str(crops), "-o", str(out), "--model", str(tiny_checkpoint), *FAST],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    shards = [_summary(out / f"translate_summary.rank{r}.json") for r in range(2)]
    assert sorted(c for s in shards for c in s) == sorted(CROPS)
    assert all(v["status"] == "done" for s in shards for v in s.values())


@pytest.mark.slow
def test_single_file_keeps_the_flat_layout(tiny_checkpoint, crops, tmp_path):
    out = tmp_path / "out"
    proc = run_ct2mr("translate", str(crops / "case_b.nii.gz"), "-o", str(out), "--model", str(tiny_checkpoint),
                     *FAST, check=True)
    assert "Synthetic MR:" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES.values()), "no case folder, no summary"
