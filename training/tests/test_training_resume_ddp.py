"""`ct2mr train` as real processes: exact resume after SIGKILL, and 2-process DDP (gloo) vs one process.

Both run the real command line on real shared volumes with tiny networks (width 2, one residual block, 32^3
patches, one CPU thread per process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ct2mr_testdata import ABDOMEN_MR, HEART_CT, REPO, need, run_ct2mr

pytestmark = pytest.mark.slow


def _args(out: Path, *extra: str, threads: int = 1) -> list[str]:
    return ["train", "--ct", str(HEART_CT), "--mr", str(ABDOMEN_MR), "--out", str(out), "--patch-size", "32",
            "--width", "2", "--blocks", "1", "--threads", str(threads), "--device", "cpu", "--progress", "none",
            "train.log_every=1", "data.val_fraction=0", *extra]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def _losses(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "G_total" in r]


def test_a_run_killed_with_sigkill_resumes_to_exactly_the_uninterrupted_weights(tmp_path):
    need(HEART_CT, ABDOMEN_MR)
    # pool of 2 so the pool's random swaps happen; deterministic algorithms on
    common = ("--steps", "10", "--checkpoint-every", "2", "train.pool_size=2", "train.deterministic=true",
              "data.foreground_bias=0.5")
    run_ct2mr(*_args(tmp_path / "straight", *common), check=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ct2mr", *_args(killed, *common)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (killed / "state.json").is_file():
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run was still going when it was killed"
    state = json.loads((killed / "state.json").read_text())
    assert 2 <= state["step"] < 10 and not (killed / "model.safetensors").exists()

    proc = run_ct2mr(*_args(killed, *common, "--resume"), check=True)
    assert "Checkpoint:" in proc.stdout
    straight, resumed = _weights(tmp_path / "straight"), _weights(killed)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), "bit-identical weights after resume"
    assert [r["step"] for r in _losses(killed)] == list(range(1, 11)), "the log restarts at the checkpoint"
    assert [r["G_total"] for r in _losses(killed)] == [r["G_total"] for r in _losses(tmp_path / "straight")]

    # a finished run is extended with --resume and a larger train.steps, and never overwritten by mistake
    proc = run_ct2mr(*_args(killed, *common))
    assert proc.returncode == 1 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    run_ct2mr("train", "--out", str(killed), "--resume", "train.steps=12", "--progress", "none", check=True)
    assert [r["step"] for r in _losses(killed)][-3:] == [10, 11, 12]
    proc = run_ct2mr("train", "--out", str(tmp_path / "nothing"), "--resume")
    assert proc.returncode == 1 and "Nothing to resume" in proc.stderr


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> float:
    keys = sorted(k for k in a if k.startswith(prefix + "."))
    va, vb = (torch.cat([d[k].flatten().double() for k in keys]) for d in (a, b))
    return float((va - vb).norm() / vb.norm())


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """torchrun 2 x batch 1 == 1 x batch 2, to float32 summation order.

    Per-sample patch streams and image pools are keyed by global batch slot, DDP averages the gradients of the two
    per-process means, and instance norm is per sample, so the arithmetic is the same as one process with batch 2;
    only the order of float32 sums differs (gradients reduced across processes vs inside one convolution). Tiny
    width-2 networks amplify such round-off chaotically over steps (and Adam turns the round-off gradients of conv
    biases before instance norm into full-size steps), so the tolerance on the weights (relative L2 difference) is
    set by a control: the same single-process run with 2 threads instead of 1, also a change of summation order
    only; the first two steps' losses must agree to 1e-5 and 1e-3. With batch or
    switchable normalisation the batch statistics are per process, and the results are not expected to match.
    """
    need(HEART_CT, ABDOMEN_MR)
    common = ("--steps", "3", "--checkpoint-every", "100")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "ct2mr",
                          *_args(tmp_path / "ddp", *common, "--batch-size", "1")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    run_ct2mr(*_args(tmp_path / "one", *common, "--batch-size", "2"), check=True)
    run_ct2mr(*_args(tmp_path / "control", *common, "--batch-size", "2", threads=2), check=True)

    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert (config["world_size"], config["global_batch"]) == (2, 2)
    ddp_log, one_log = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    for key in ("G_adv_MR", "G_adv_CT", "cycle_CT", "cycle_MR", "identity_MR", "identity_CT", "D_MR", "D_CT"):
        assert ddp_log[0][key] == pytest.approx(one_log[0][key], rel=1e-5), f"step 1 {key}: same patches, same nets"
        assert ddp_log[1][key] == pytest.approx(one_log[1][key], rel=1e-3), f"step 2 {key}: same first update"
    a, b, c = (_weights(tmp_path / name) for name in ("ddp", "one", "control"))
    for net in ("G", "F", "D_MR", "D_CT"):
        got, allowed = _relative_difference(a, b, net), _relative_difference(c, b, net)
        print(f"{net}: |DDP - one| / |one| = {got:.2e}, control (threads 2 vs 1) = {allowed:.2e}")
        assert got <= 3 * allowed + 1e-4, (net, got, allowed)
