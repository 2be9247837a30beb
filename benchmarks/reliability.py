"""Fault table of issue 15 ("nothing lost, nothing silently wrong"): run every fault as a user would and report.

Each row is a real `ct2mr` command on the shared data (../shared/data) in a scratch folder, with a real fault: a full
tmpfs (mounted here; needs root), a disk that fills while the networks run, a file-size limit (``ulimit -f``), a
read-only file system, a writer killed with SIGKILL, inputs that are not CTs, damaged checkpoints and run folders.
For each it prints the command, the exit status, the seconds, the first line of the message and what was left in
the output folder, as the Markdown table of benchmarks/RELIABILITY.md:

    .venv/bin/python benchmarks/reliability.py [--work /tmp/ct2mr_reliability] > table.md

Rows that need a mount are reported as skipped when mounting is not permitted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CT2MR_DATA", REPO.parent / "shared" / "data"))
HEART = DATA / "ct" / "thorax_cta_heart_crop_1p5mm.nii.gz"
ABDOMEN_CT = DATA / "ct" / "abdomen_pelvis_ct_3mm.nii.gz"
ABDOMEN_MR = DATA / "mr" / "upper_abdomen_mr_3mm.nii.gz"
CARDIAC_MR = DATA / "mr" / "cardiac_cine_sax_phase01.nii.gz"
CT2MR = [sys.executable, "-m", "ct2mr"]
ROWS: list[dict] = []


def crop(path: Path, size: tuple[int, int, int]) -> Path:
    """A central crop of the heart CT (1.5 mm, HU)."""
    ct = sitk.ReadImage(str(HEART))
    index = [(n - s) // 2 for n, s in zip(ct.GetSize(), size)]
    sitk.WriteImage(sitk.RegionOfInterest(ct, list(size), index), str(path))
    return path


def variant(base: Path, path: Path, kind: str) -> Path:
    """The crop made constant, given NaN/inf voxels, or a wrong spacing."""
    ct = sitk.ReadImage(str(base))
    array = sitk.GetArrayFromImage(ct).astype(np.float32)
    if kind == "constant":
        array[:] = 0
    elif kind == "nan":
        array[3, :10, :10] = np.nan
        array[4, 0, :5] = np.inf
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    if kind == "tiny":
        image.SetSpacing((0.01, 0.01, 0.01))
    elif kind == "huge":
        image.SetSpacing((50.0, 50.0, 50.0))
    sitk.WriteImage(image, str(path))
    return path


def mount(path: Path, size: str, read_only: bool = False) -> str | None:
    """Mount a tmpfs; the reason when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                           str(path)], capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or "mount failed")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def listing(folder: Path | None) -> str:
    if folder is None:
        return ""
    if not folder.exists():
        return "folder not created"
    names = sorted(os.listdir(folder))
    return "empty" if not names else ", ".join(names)


def message(stderr: str) -> str:
    """The lines that matter: ct2mr's own errors, warnings and notes (not ITK's or tracebacks)."""
    lines = [line.strip() for line in stderr.splitlines()
             if line.startswith(("ct2mr", "WARNING")) or "error:" in line]
    return " / ".join(lines) or stderr.strip().splitlines()[-1] if stderr.strip() else ""


def row(fault: str, shown: str, argv: list[str], left: Path | None = None, fsize_kb: int | None = None,
        env: dict | None = None, note: str = "") -> subprocess.CompletedProcess:
    """Run one command and record it."""
    cmd = argv
    if fsize_kb is not None:
        cmd = ["bash", "-c", f"ulimit -f {fsize_kb} && exec " + " ".join(f"'{a}'" for a in argv)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    ROWS.append({"fault": fault, "command": shown, "exit": proc.returncode,
                 "seconds": round(time.perf_counter() - start, 1), "message": message(proc.stderr),
                 "left": "; ".join(part for part in (listing(left), note) if part)})
    print(f"{fault}: exit {proc.returncode}", file=sys.stderr)
    return proc


def skip(fault: str, shown: str, reason: str) -> None:
    ROWS.append({"fault": fault, "command": shown, "exit": "skipped", "seconds": "", "message": reason, "left": ""})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/ct2mr_reliability", help="scratch folder (emptied first)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    small = crop(work / "ct_40x40x30.nii.gz", (40, 40, 30))
    medium = crop(work / "ct_80x80x60.nii.gz", (80, 80, 60))

    # ---- disk full and short writes ----
    mnt = work / "tmpfs_1m"
    reason = mount(mnt, "1m")
    if reason:
        skip("full disk (1 MB tmpfs)", "ct2mr translate HEART -o TMPFS_1M/out", reason)
    else:
        row("full disk (1 MB tmpfs)", "ct2mr translate heart_crop.nii.gz -o /mnt/1MB_tmpfs/out",
            [*CT2MR, "translate", str(HEART), "-o", str(mnt / "out"), "--progress", "none"], mnt)
        umount(mnt)

    mnt = work / "tmpfs_8m"
    reason = mount(mnt, "8m")
    if reason:
        skip("disk fills during the translation", "ct2mr translate ... (tmpfs filled at stage G)", reason)
    else:
        start = time.perf_counter()
        proc = subprocess.Popen([*CT2MR, "translate", str(medium), "-o", str(mnt / "out"), "--progress", "json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        filled = False
        for line in proc.stdout:
            if not filled and json.loads(line).get("stage") == "G":
                (mnt / "filler").write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 300_000))
                filled = True
        code = proc.wait()
        ROWS.append({"fault": "disk fills while the networks run (8 MB tmpfs filled to 300 kB free after the checks)",
                     "command": "ct2mr translate ct_80x80x60.nii.gz -o /mnt/8MB_tmpfs/out --progress json",
                     "exit": code, "seconds": round(time.perf_counter() - start, 1),
                     "message": message(proc.stderr.read()), "left": listing(mnt)})
        umount(mnt)

    row("file-size limit: every write past 1 MB fails (EFBIG)", "ulimit -f 1000; ct2mr translate ct_80x80x60.nii.gz "
        "-o out_fsize", [*CT2MR, "translate", str(medium), "-o", str(work / "out_fsize"), "--progress", "none"],
        work / "out_fsize", fsize_kb=1000)
    batch = work / "batch_in"
    batch.mkdir()
    shutil.copy(medium, batch / "a.nii.gz")
    crop(batch / "b.nii.gz", (70, 80, 60))
    proc = row("batch with a file-size limit", "ulimit -f 1000; ct2mr translate batch_in/ -o out_batch",
               [*CT2MR, "translate", str(batch), "-o", str(work / "out_batch"), "--progress", "none"],
               work / "out_batch", fsize_kb=1000)
    summary = work / "out_batch" / "translate_summary.json"
    if summary.is_file():
        cases = json.loads(summary.read_text())["cases"]
        ROWS[-1]["left"] += "; summary: " + ", ".join(f"{c['case']} {c['status']}" for c in cases) + "; case " \
            "folders: " + ", ".join(f"{c['case']}/ {listing(work / 'out_batch' / c['case'])}" for c in cases)

    killed = work / "out_killed"
    killed.mkdir()
    subprocess.run([sys.executable, "-c", "import os, signal, sys; from ct2mr.io.images import atomic_path; "
                    "atomic_path(os.path.join(sys.argv[1], 'synthetic_mr.nii.gz')).write_bytes(b'half'); "
                    "os.kill(os.getpid(), signal.SIGKILL)", str(killed)], cwd=REPO)
    before = listing(killed)
    row("SIGKILL during a write left a hidden temporary file; rerun into the folder",
        "ct2mr translate ct_40x40x30.nii.gz -o out_killed", [*CT2MR, "translate", str(small), "-o", str(killed),
                                                             "--progress", "none"], killed,
        note=f"before the rerun: {before}")

    # ---- the output folder ----
    afile = work / "afile"
    afile.write_text("x\n")
    row("-o names a file", "ct2mr translate heart_crop.nii.gz -o afile",
        [*CT2MR, "translate", str(HEART), "-o", str(afile), "--progress", "none"])
    row("-o under /proc", "ct2mr translate heart_crop.nii.gz -o /proc/ct2mr_out",
        [*CT2MR, "translate", str(HEART), "-o", "/proc/ct2mr_out", "--progress", "none"])
    mnt = work / "readonly"
    reason = mount(mnt, "1m", read_only=True)
    if reason:
        skip("-o on a read-only file system", "ct2mr translate ... -o READONLY/out", reason)
    else:
        row("-o on a read-only file system", "ct2mr translate heart_crop.nii.gz -o /mnt/readonly/out",
            [*CT2MR, "translate", str(HEART), "-o", str(mnt / "out"), "--progress", "none"])
        umount(mnt)
    occupied = work / "out_occupied"
    occupied.mkdir()
    (occupied / "synthetic_mr.nii.gz").write_bytes(b"someone else's file")
    row("-o already holds outputs (no --overwrite)", "ct2mr translate heart_crop.nii.gz -o out_occupied",
        [*CT2MR, "translate", str(HEART), "-o", str(occupied), "--progress", "none"], occupied,
        note="file unchanged" if (occupied / "synthetic_mr.nii.gz").read_bytes() == b"someone else's file" else
        "FILE CHANGED")

    # ---- inputs ----
    row("an MR given as the CT", "ct2mr translate upper_abdomen_mr_3mm.nii.gz -o out_mr",
        [*CT2MR, "translate", str(ABDOMEN_MR), "-o", str(work / "out_mr"), "--progress", "none"], work / "out_mr")
    for kind, fault in (("constant", "a constant volume"), ("tiny", "spacing 0.01 mm"), ("huge", "spacing 50 mm")):
        path = variant(small, work / f"{kind}.nii.gz", kind)
        row(fault, f"ct2mr translate {path.name} -o out_{kind}", [*CT2MR, "translate", str(path), "-o",
                                                                  str(work / f"out_{kind}"), "--progress", "none"],
            work / f"out_{kind}")
    path = variant(small, work / "nan.nii.gz", "nan")
    row("NaN and inf voxels (reported and replaced, not refused)", "ct2mr translate nan.nii.gz -o out_nan",
        [*CT2MR, "translate", str(path), "-o", str(work / "out_nan"), "--progress", "none"], work / "out_nan")

    # ---- training ----
    common = ["--steps", "1", "--progress", "none"]
    row("train --patch-size too large for the memory", "ct2mr train --ct heart_crop --mr abdomen_mr --out run256 "
        "--patch-size 256", [*CT2MR, "train", "--ct", str(HEART), "--mr", str(ABDOMEN_MR), "--out",
                             str(work / "run256"), "--patch-size", "256", *common], work / "run256")
    tiny = ["--patch-size", "32", "--width", "2", "--blocks", "1"]
    row("train: the same file as --ct and --mr", "ct2mr train --ct abdomen_mr --mr abdomen_mr --out run_same",
        [*CT2MR, "train", "--ct", str(ABDOMEN_MR), "--mr", str(ABDOMEN_MR), "--out", str(work / "run_same"), *tiny,
         *common], work / "run_same")
    row("train: an MR given as --ct", "ct2mr train --ct cardiac_mr --mr abdomen_mr --out run_mr_ct",
        [*CT2MR, "train", "--ct", str(CARDIAC_MR), "--mr", str(ABDOMEN_MR), "--out", str(work / "run_mr_ct"), *tiny,
         *common], work / "run_mr_ct")
    row("train: a CT given as --mr", "ct2mr train --ct heart_crop --mr abdomen_pelvis_ct --out run_ct_mr",
        [*CT2MR, "train", "--ct", str(HEART), "--mr", str(ABDOMEN_CT), "--out", str(work / "run_ct_mr"), *tiny,
         *common], work / "run_ct_mr")
    run = work / "run_resume"
    subprocess.run([*CT2MR, "train", "--ct", str(HEART), "--mr", str(ABDOMEN_MR), "--out", str(run), "--steps", "2",
                    "--checkpoint-every", "1", *tiny, "--progress", "none"], cwd=REPO, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (run / "state.json").write_text('{"step": 2, "dir": "checkp')
    row("--resume with a corrupt state.json", "ct2mr train --out run_resume --resume train.steps=3",
        [*CT2MR, "train", "--out", str(run), "--resume", "train.steps=3", "--progress", "none"],
        note="state.json now at step " + "{}")
    try:
        ROWS[-1]["left"] = ROWS[-1]["left"].format(json.loads((run / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        pass
    shutil.rmtree(run / "checkpoints")
    (run / "state.json").write_text("garbage")
    row("--resume with a corrupt state.json and no checkpoint folder", "ct2mr train --out run_resume --resume "
        "train.steps=4", [*CT2MR, "train", "--out", str(run), "--resume", "train.steps=4", "--progress", "none"])

    # ---- models ----
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(REPO / "training"))
    from ct2mr.models.checkpoint import default_model_path

    source = default_model_path()
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(source))
    missing = dict(tensors)
    del missing["G.model.10.body.0.weight"]
    save_file(missing, str(work / "missing_tensor.safetensors"), metadata=metadata)
    save_file(tensors, str(work / "roi_0.safetensors"),
              metadata={**metadata, "inference": json.dumps({"roi_size": [0, 0, 0], "overlap": 0.25})})
    row("models import of a checkpoint with a missing tensor", "ct2mr models import missing_tensor.safetensors "
        "--name bad --version 1", [*CT2MR, "models", "import", str(work / "missing_tensor.safetensors"), "--name",
                                   "bad", "--version", "1"], work / "cache" / "models",
        env={"CT2MR_CACHE": str(work / "cache")})
    row("--model with a missing tensor", "ct2mr translate heart_crop.nii.gz -o out_model --model "
        "missing_tensor.safetensors", [*CT2MR, "translate", str(HEART), "-o", str(work / "out_model"), "--model",
                                       str(work / "missing_tensor.safetensors"), "--progress", "none"],
        work / "out_model")
    row("--model whose inference settings say roi_size [0, 0, 0]", "ct2mr translate heart_crop.nii.gz -o out_roi "
        "--model roi_0.safetensors", [*CT2MR, "translate", str(HEART), "-o", str(work / "out_roi"), "--model",
                                      str(work / "roi_0.safetensors"), "--progress", "none"], work / "out_roi")

    start = time.perf_counter()
    proc = subprocess.Popen([*CT2MR, "translate", str(small), "-o", str(work / "out_fp16"), "--device", "cpu",
                             "--precision", "fp16", "--progress", "json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    note = ""
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "warning" and "fp16" in event["message"]:
            note = event["message"]
            break
    seconds = round(time.perf_counter() - start, 1)
    proc.send_signal(signal.SIGINT)
    code = proc.wait()
    ROWS.append({"fault": "--precision fp16 on the CPU", "command": "ct2mr translate ct_40x40x30.nii.gz -o out_fp16 "
                 "--device cpu --precision fp16 --progress json", "exit": f"{code} (stopped with Ctrl-C after the "
                 "note)", "seconds": seconds, "message": f"warning event: {note}", "left": listing(work / "out_fp16")})

    print("| fault | command | exit | s | message (stderr) | left in the output folder |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        cells = [r["fault"], f"`{r['command']}`", str(r["exit"]), str(r["seconds"]), r["message"], r["left"]]
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
