"""The trainer (issue 4): schedules, image pool, freeze-D, objectives, patch streams, every preset on real data.

The slow resume-after-SIGKILL and DDP tests live in ``test_training_resume_ddp.py``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2mr.models.checkpoint import load_checkpoint, read_metadata
from ct2mr.training.config import list_presets, load_config
from ct2mr.preprocessing.collections import DomainVolume, load_domain
from ct2mr.training.data import (PairedPatchSampler, PatchPrefetcher, TrainingBatches, UnpairedPatchSampler, make_split,
                                 pair_volumes, random_patch, read_split)
from ct2mr.training.trainer import (CycleGANTrainer, ImagePool, d_frozen, enable_gradient_checkpointing, lr_factor,
                            seed_everything, train_run)
from ct2mr_testdata import ABDOMEN_MR, DATA, HEART_CT, need

#: Tiny networks and patches: every preset's structure at a size that trains in about a second per step on CPU.
TINY = ["model.generator.base_channels=2", "model.discriminator.base_channels=2", "model.generator.n_blocks=1",
        "model.generator.depth=2", "data.patch_size=[32,32,32]", "train.device=cpu", "train.val_every=0"]


def tiny(preset: str = "m1", *extra: str):
    return load_config(preset, TINY + list(extra))


def batch(seed: int = 0, b: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ct": torch.rand(b, 1, 32, 32, 32, generator=g) * 2 - 1,
            "mr": torch.rand(b, 1, 32, 32, 32, generator=g) * 2 - 1}


def trainer(config) -> CycleGANTrainer:
    seed_everything(config.train.seed)
    return CycleGANTrainer(config, torch.device("cpu"))


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


# ---- schedules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, start, expected", [
    (10, 5, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0]),
    (4, 0, [1, 0.75, 0.5, 0.25, 0]),
    (4, 4, [1, 1, 1, 1, 1]),
])
def test_linear_decay_factor(steps, start, expected):
    assert [lr_factor(k, steps, "linear", start) for k in range(steps + 1)] == pytest.approx(expected)
    assert lr_factor(3, steps, "none", start) == 1.0


def test_trainer_learning_rates_follow_the_schedule_with_ttur():
    t = trainer(tiny("m1", "train.steps=10", "train.lr_g=2e-4", "train.lr_d=1e-4"))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler stepped without optimiser steps
        for _ in range(11):
            seen.append(t.lr())
            t.sched_g.step(), t.sched_d.step()
    factors = [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0]  # decay_start defaults to half the steps
    assert [g for g, _ in seen] == pytest.approx([2e-4 * f for f in factors])
    assert [d for _, d in seen] == pytest.approx([1e-4 * f for f in factors])


def test_freeze_schedule():
    assert [d_frozen(s, 4, 1) for s in range(1, 9)] == [False, False, False, True] * 2
    assert [d_frozen(s, 5, 2) for s in range(1, 6)] == [False, False, False, True, True]
    assert not any(d_frozen(s, 0, 0) for s in range(1, 10))


def test_frozen_steps_skip_the_discriminator_update_but_not_the_generators():
    t = trainer(tiny("m1", "train.freeze_d_every=2", "train.freeze_d_steps=1"))
    d0, g0 = params(t.D_MR) + params(t.D_CT), params(t.G)
    first = t.train_step(batch(0))
    d1, g1 = params(t.D_MR) + params(t.D_CT), params(t.G)
    second = t.train_step(batch(1))
    d2, g2 = params(t.D_MR) + params(t.D_CT), params(t.G)
    assert first["D_updated"] == 1 and second["D_updated"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(d0, d1)), "step 1 updates D"
    assert all(torch.equal(a, b) for a, b in zip(d1, d2)), "step 2 (frozen) leaves D exactly as it was"
    assert any(not torch.equal(a, b) for a, b in zip(g1, g2)), "G still learns during frozen steps"
    assert all(p.requires_grad for p in t.D_MR.parameters())


# ---- image pool ---------------------------------------------------------------------------------------------
def test_image_pool_fills_then_swaps_with_probability_one_half():
    pool = ImagePool(3, slots=[0], global_batch=1, seed=1)
    images = [torch.full((1, 1, 2, 2, 2), float(i)) for i in range(400)]
    out = [float(pool.query(im)[0, 0, 0, 0, 0]) for im in images]
    assert out[:3] == [0.0, 1.0, 2.0], "while filling, the new volume is returned"
    fresh = sum(o == i for i, o in enumerate(out[3:], start=3))
    assert 150 < fresh < 250, f"about half the later queries return the new volume, got {fresh}/397"
    assert all(o <= i for i, o in enumerate(out)), "only the new or past volumes come back"
    assert len(pool.images[0]) == 3
    assert float(ImagePool(0, [0], 1).query(images[5])[0, 0, 0, 0, 0]) == 5, "size 0 passes volumes through"


def test_image_pool_state_round_trip_and_sharding_by_slot():
    a = ImagePool(4, slots=[0, 1], global_batch=2, seed=3)
    shards = [ImagePool(4, slots=[s], global_batch=2, seed=3) for s in (0, 1)]
    assert a.capacity == 2 and shards[0].capacity == 2
    for i in range(20):
        pair = torch.stack([torch.full((1, 2, 2, 2), float(i)), torch.full((1, 2, 2, 2), 100.0 + i)])
        both = a.query(pair)
        split = torch.cat([shards[0].query(pair[:1]), shards[1].query(pair[1:])])
        assert torch.equal(both, split), "one process with batch 2 = two processes with batch 1"
    saved = copy.deepcopy(a.state_dict())
    replay = [a.query(torch.stack([torch.full((1, 2, 2, 2), float(j))] * 2)) for j in range(8)]
    a.load_state_dict(saved)
    again = [a.query(torch.stack([torch.full((1, 2, 2, 2), float(j))] * 2)) for j in range(8)]
    assert all(torch.equal(x, y) for x, y in zip(replay, again)), "a restored pool continues exactly"


# ---- objectives inside the trainer --------------------------------------------------------------------------
def test_histogram_loss_gradients_reach_G_through_the_trainer_objective():
    """Same init, same batch, plain SGD (update = -lr * grad): hist vs M1 differ by exactly lambda * d L_hist / d G."""
    from ct2mr.losses import histogram_loss

    sgd = ["train.optimizer=sgd", "train.betas=[0.0,0.999]", "train.lr_g=1.0", "train.pool_size=0",
           "train.decay=none"]
    b = batch(4)
    base, hist = trainer(tiny("m1", *sgd)), trainer(tiny("hist", *sgd, "model.lambda_hist=2.0"))
    G0 = copy.deepcopy(base.G)
    expected = torch.autograd.grad(2.0 * histogram_loss(G0(b["ct"]), b["mr"], 64, "w1"), list(G0.parameters()))
    f0 = params(base.F)
    out = hist.train_step(b)
    base.train_step(b)
    assert out["hist_MR"] > 0
    diff = [(pb - ph) for pb, ph in zip(params(base.G), params(hist.G))]  # = lr * lambda * grad(hist)
    assert max(float(e.abs().max()) for e in expected) > 1e-6, "the histogram loss has a gradient w.r.t. G"
    # up to the float32 round-off of the other (identical) gradient terms, accumulated in another order
    got, want = torch.cat([d.flatten() for d in diff]), torch.cat([e.flatten() for e in expected])
    assert float((got - want).norm()) <= 1e-3 * float(want.norm())
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())
    assert all(torch.allclose(a, b_, atol=1e-7) for a, b_ in zip(params(hist.F), params(base.F))), \
        "F gets no histogram gradient (hist_symmetric is off)"
    assert any(not torch.equal(a, b_) for a, b_ in zip(f0, params(hist.F)))


@pytest.mark.parametrize("option", ["train.grad_checkpointing=true", "train.channels_last=true"])
def test_memory_options_do_not_change_the_result(option):
    plain, other = trainer(tiny("m1")), trainer(tiny("m1", option))
    for i in range(2):
        a, b = plain.train_step(batch(i)), other.train_step(batch(i))
        assert a["G_total"] == pytest.approx(b["G_total"], rel=1e-5)
    probe = batch(9)["ct"]
    with torch.no_grad():  # outputs, not raw weights: conv biases before instance norm only see round-off gradients,
        torch.testing.assert_close(plain.G(probe), other.G(probe), rtol=1e-4, atol=1e-4)  # which Adam rescales
    if "checkpointing" in option:
        assert other.checkpointed_blocks == 2  # one residual block in each of G and F


def test_gradient_checkpointing_wraps_unet_nodes_without_renaming_parameters():
    from ct2mr.networks import build_generator

    net = build_generator({"name": "unetpp", "base_channels": 2, "depth": 2, "norm": "instance"})
    names = [n for n, _ in net.named_parameters()]
    assert enable_gradient_checkpointing(net) > 3
    assert [n for n, _ in net.named_parameters()] == names
    x = torch.rand(1, 1, 16, 16, 16, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("extra", [
    ["model.rician.corrupt_d=true", "model.rician.tau=0.05", "model.rician.sigma_range=[0.01,0.05]"],
    ["model.lambda_mi=0.05", "model.lambda_hist=1", "model.hist_mask=true", "model.hist_symmetric=true"],
    ["model.alpha=0.1"],
    ["model.lambda_mind=1.0"],
    ["model.lambda_nce=1.0", "model.nce_patches=16"],
])
def test_optional_terms_are_wired_and_logged(extra):
    out = trainer(tiny("m1", *extra)).train_step(batch(2))
    if "model.lambda_mi=0.05" in extra:
        assert {"mi", "hist_MR", "hist_CT"} <= set(out) and out["mi"] <= 0
    if "model.lambda_mind=1.0" in extra:
        assert {"mind_MR", "mind_CT"} <= set(out) and out["mind_MR"] > 0
    if "model.nce_patches=16" in extra:
        assert {"nce_MR", "nce_CT"} <= set(out) and 0 < out["nce_MR"] < 2 * np.log(16)
    assert all(np.isfinite(v) for v in out.values())
    assert out["G_total"] != pytest.approx(trainer(tiny("m1")).train_step(batch(2))["G_total"])


@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu():
    t = trainer(tiny("m1", "train.precision=bf16"))
    assert t.dtype == torch.bfloat16
    out = t.train_step(batch(0))
    assert np.isfinite(out["G_total"]) and np.isfinite(out["D_MR"])


# ---- patch streams and splits -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_volumes():
    need(HEART_CT, ABDOMEN_MR)
    return load_domain(HEART_CT, "ct"), load_domain(ABDOMEN_MR, "mr")


def test_slots_make_one_process_equal_to_several(real_volumes):
    ct, mr = real_volumes
    one = UnpairedPatchSampler(ct, mr, (32, 32, 32), seed=5, slots=[0, 1])
    ranks = [UnpairedPatchSampler(ct, mr, (32, 32, 32), seed=5, slots=[s]) for s in (0, 1)]
    for _ in range(3):
        x, y = one.sample()
        parts = [r.sample() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert x.shape == (2, 1, 32, 32, 32) and x.dtype == torch.float32


def test_prefetcher_hands_out_the_same_stream_and_an_exact_state(real_volumes):
    ct, mr = real_volumes
    make = lambda: TrainingBatches(UnpairedPatchSampler(ct, mr, (32, 32, 32), seed=2, balance="volume",  # noqa: E731
                                                        foreground_bias=0.5))
    sync, ahead = PatchPrefetcher(make(), 0), PatchPrefetcher(make(), 3)
    try:
        for _ in range(4):
            a, b = sync.next(), ahead.next()
            assert torch.equal(a["ct"], b["ct"]) and torch.equal(a["mr"], b["mr"])
        state = ahead.state_dict()
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))  # the state is plain data (JSON-compatible)
        nxt = sync.next()
        assert torch.equal(resumed.sample()["ct"], nxt["ct"])
    finally:
        ahead.close()


def test_foreground_bias_centres_patches_on_tissue(real_volumes):
    ct = real_volumes[0][0].array
    from ct2mr.training.data import _foreground_index

    index = _foreground_index(ct)
    fraction = {}
    for bias in (0.0, 1.0):
        rng = np.random.default_rng(0)
        fraction[bias] = np.mean([np.mean(random_patch(ct, (32, 32, 32), rng, foreground=0, foreground_bias=bias,
                                                       foreground_index=index) > -0.95) for _ in range(40)])
    assert fraction[1.0] > fraction[0.0]


def test_balance_by_source_draws_each_acquisition_equally():
    def vol(name: str, group: str) -> DomainVolume:
        return DomainVolume(name, group, np.zeros((40, 40, 40), np.float32), None, group)  # type: ignore[arg-type]

    mr = [vol(f"cine_t{i:03d}", "cine.nii.gz") for i in range(20)] + [vol("abdomen", "abdomen.nii.gz")]
    counts = {}
    for mode in ("none", "source", "volume"):
        s = UnpairedPatchSampler([vol("ct", "ct")], mr, (32, 32, 32), seed=0, foreground=0, balance=mode)
        draws = [s.mr[s._slot_map[0].drawers[1].draw(s._slot_map[0].rng)].group for _ in range(420)]
        counts[mode] = draws.count("abdomen.nii.gz")
    assert counts["source"] == 210, "one draw in two from each source"
    assert counts["volume"] == 20, "every volume equally often"
    assert counts["none"] < 60


def test_paired_patches_are_aligned_and_pairs_must_share_a_grid(real_volumes):
    ct = real_volumes[0]
    mr_like = [DomainVolume("pair_mr", "p", -ct[0].array, ct[0].record)]
    sampler = PairedPatchSampler(pair_volumes(ct, mr_like), (32, 32, 32), seed=1, batch_size=2)
    x, y = sampler.sample()
    assert torch.equal(x, -y), "CT and MR patches are cropped at the same place"
    with pytest.raises(ValueError, match="one voxel grid"):
        pair_volumes(ct, real_volumes[1])


def test_split_is_by_source_reproducible_and_files_round_trip(tmp_path):
    need(DATA / "ct")
    a = make_split([DATA / "ct"], [ABDOMEN_MR], 0.2, 0.2, seed=0)
    assert a == make_split([DATA / "ct"], [ABDOMEN_MR], 0.2, 0.2, seed=0)
    n = len(sum(a["ct"].values(), []))
    assert len(a["ct"]["val"]) == len(a["ct"]["test"]) == int(0.2 * n) and a["ct"]["train"]
    assert a["mr"] == {"train": [str(ABDOMEN_MR.resolve())], "val": [], "test": []}, "one source stays in training"
    assert make_split([DATA / "ct"], [ABDOMEN_MR], 0.2, 0.2, seed=1) != a or n < 3
    (tmp_path / "split.json").write_text(json.dumps({"train": {"ct": ["a.nii.gz"], "mr": ["b.nii.gz"]},
                                                     "val": {"ct": ["/abs/c.nii.gz"]}}))
    got = read_split(tmp_path / "split.json")
    assert got["ct"]["train"] == [str(tmp_path / "a.nii.gz")] and got["ct"]["val"] == ["/abs/c.nii.gz"]
    (tmp_path / "split.csv").write_text("path,modality,split\na.nii.gz,CT,train\nb.nii.gz,mr,val\n")
    got = read_split(tmp_path / "split.csv")
    assert got["ct"]["train"] == [str(tmp_path / "a.nii.gz")] and got["mr"]["val"] == [str(tmp_path / "b.nii.gz")]
    (tmp_path / "bad.csv").write_text("path,modality,split\na,pet,train\n")
    with pytest.raises(ValueError, match="modality"):
        read_split(tmp_path / "bad.csv")


def test_preprocessed_hdf5_folders_are_grouped_by_their_source(tmp_path):
    need(HEART_CT)
    from ct2mr.preprocessing.batch import preprocess_batch
    from ct2mr.training.data import source_groups

    preprocess_batch([HEART_CT], tmp_path / "prep", "ct", jobs=1)
    groups = source_groups(tmp_path / "prep")
    assert list(groups) == [str(HEART_CT.resolve())] and groups[str(HEART_CT.resolve())][0].endswith(".h5")
    (volume,) = load_domain(tmp_path / "prep", "ct")
    assert volume.group == str(HEART_CT.resolve()) and volume.source.endswith(".h5")


# ---- every preset trains on real shared data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def paired_mr(tmp_path_factory) -> Path:
    """An MR-like volume on the heart CT's grid (a monotone intensity map of the CT): a registered pair."""
    need(HEART_CT)
    image = sitk.ReadImage(str(HEART_CT))
    array = np.sqrt(np.clip(sitk.GetArrayFromImage(image).astype(np.float32) + 1000, 0, None))
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    path = tmp_path_factory.mktemp("pair") / "heart_mr_like.nii.gz"
    sitk.WriteImage(out, str(path))
    return path


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_trains_on_real_volumes(preset, tmp_path, paired_mr):
    need(HEART_CT, ABDOMEN_MR)
    extra = [f'data.ct=["{HEART_CT}"]', f'data.mr=["{ABDOMEN_MR}"]', "train.steps=2", "train.threads=1",
             "train.val_every=2", "train.val_crop=[48,48,48]", f'data.val_ct=["{HEART_CT}"]', "train.log_every=1"]
    if preset == "paired":
        extra += [f'data.paired_ct=["{HEART_CT}"]', f'data.paired_mr=["{paired_mr}"]']
    if preset == "law":  # a small law fit (the fit itself is tested in test_intensity_law.py)
        extra += ["model.law.restarts=1", "model.law.iterations=5", "model.law.samples=500", "model.law.spacing_mm=4"]
    try:
        path = train_run(tiny(preset, *extra), tmp_path / preset, command=f"test {preset}")
    except NotImplementedError as exc:
        pytest.skip(f"{preset}: {exc}")
    log = [json.loads(line) for line in (tmp_path / preset / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "G_total" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["G_total"]) for r in steps)
    validation = [r["validation"] for r in log if "validation" in r]
    assert validation and {"ct_cycle_ssim", "ct_cycle_psnr", "ct_cycle_mae", "hist_w1"} <= set(validation[-1])
    checkpoint = load_checkpoint(path)  # what `ct2mr translate` loads
    with torch.no_grad():
        assert checkpoint.G(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    meta = read_metadata(tmp_path / preset / "last.safetensors")
    assert meta["training"]["preset"] == preset and meta["training"]["config"]["model"]["adversarial"] == \
        load_config(preset, [] if preset != "paired" else ['data.paired_ct=["a"]', 'data.paired_mr=["b"]']
                    ).model.adversarial
    resolved = load_config(base=tmp_path / preset / "config.yaml")
    assert resolved.data.ct == [str(HEART_CT.resolve())] and resolved.preset == preset


def test_tensorboard_has_every_loss_term_and_triplanar_panels(tmp_path):
    need(HEART_CT, ABDOMEN_MR)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny("hist", f'data.ct=["{HEART_CT}"]', f'data.mr=["{ABDOMEN_MR}"]', f'data.val_ct=["{HEART_CT}"]',
                  "train.steps=2", "train.log_every=1", "train.val_every=2", "train.val_crop=[48,48,48]")
    train_run(config, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/G_adv_MR", "loss/cycle_CT", "loss/identity_MR", "loss/hist_MR", "loss/D_MR", "loss/G_total",
            "lr/G", "lr/D", "train/patches_per_s", "val/ct_cycle_ssim", "val/hist_w1"} <= scalars
    assert "val/ct_triplanar" in events.Tags()["images"]
    assert [e.step for e in events.Scalars("loss/cycle")] == [1, 2]


def test_checkpoint_configs_carry_relative_data_paths(tmp_path):
    from ct2mr.training.trainer import portable_config

    config = {"data": {"ct": [str(tmp_path / "data" / "ct")], "mr": ["relative/mr.nii.gz"],
                       "split_file": str(tmp_path / "split.json")}, "train": {"steps": 3}}
    out = portable_config(config, start=tmp_path / "repo")
    assert out["data"]["ct"] == [os.path.join("..", "data", "ct")]
    assert out["data"]["mr"] == ["relative/mr.nii.gz"]
    assert out["data"]["split_file"] == os.path.join("..", "split.json")
    assert config["data"]["ct"] == [str(tmp_path / "data" / "ct")], "the input is not modified"


def test_max_minutes_stops_cleanly_with_a_loadable_model_and_snapshots(tmp_path):
    """Issue 13: ``--max-minutes`` ends the run when the budget is spent; the model and snapshots load."""
    need(HEART_CT, ABDOMEN_MR)
    config = tiny("sc", f'data.ct=["{HEART_CT}"]', f'data.mr=["{ABDOMEN_MR}"]', "train.steps=100000",
                  "train.max_minutes=0.05", "train.snapshot_minutes=0.02", "train.threads=1", "train.log_every=1",
                  "train.checkpoint_every=100000")
    path = train_run(config, tmp_path / "run")
    meta = read_metadata(path)["training"]
    assert meta["stopped_by"] == "max_minutes" and 1 <= meta["steps"] < 100000
    assert 3.0 <= meta["elapsed_s"] < 60.0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == meta["steps"]
    assert log[-1]["lr_G"] < config.train.lr_g  # the decay followed the clock
    snapshots = sorted((tmp_path / "run" / "snapshots").glob("step_*.safetensors"))
    assert len(snapshots) >= 2 and snapshots[-1].name == f"step_{meta['steps']:08d}.safetensors"
    with torch.no_grad():
        assert load_checkpoint(snapshots[0]).G(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == meta["steps"] and state["elapsed_s"] >= 3.0
