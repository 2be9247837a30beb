"""The unpaired intensity-law fit and the generators' intensity curve (issue 13)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from ct2mr.models.checkpoint import load_checkpoint
from ct2mr.training.config import load_config
from ct2mr.training.intensity_law import (IntensityLaw, blurred_at, estimate_noise_sigma, fit_intensity_law,
                                          hat_basis, inverse_intensity_law, law_knots, read_intensity_laws,
                                          relative_features, target_features)
from ct2mr.networks.resnet import IntensityCurve, ResnetGenerator3D
from ct2mr.training.trainer import CycleGANTrainer, seed_everything, train_run
from ct2mr_testdata import ABDOMEN_MR, HEART_CT, need

#: Phantom tissue intensities on the normalised source scale and the non-monotone law a target modality applies:
#: a "fat" shell under the skin that is the target's brightest tissue, a "muscle" core, a small bright "bone".
SOURCE = {"air": -1.0, "fat": -0.1, "muscle": 0.05, "bone": 0.6}
TRUE_LAW = {"air": -1.0, "fat": 0.9, "muscle": -0.2, "bone": -0.6}


def phantom(size: int, centre_shift: float, law: dict[str, float]) -> np.ndarray:
    """A (size, size, size) body: an ellipsoid with a 4-voxel fat shell, a muscle core and a bone rod."""
    z, y, x = np.mgrid[:size, :size, :size].astype(np.float32) / size - 0.5
    r = np.sqrt((z / 0.45) ** 2 + (y / 0.38) ** 2 + ((x - centre_shift) / 0.42) ** 2)
    out = np.full((size,) * 3, law["air"], np.float32)
    out[r < 1.0] = law["fat"]
    out[r < 0.72] = law["muscle"]
    out[(np.hypot(y + 0.1, x - centre_shift) < 0.06) & (r < 0.72)] = law["bone"]
    return out


def test_hat_basis_is_a_partition_of_unity():
    knots = law_knots(9)
    x = np.linspace(-1.3, 1.3, 101, dtype=np.float32)
    total = sum(hat_basis(x, knots, k) for k in range(len(knots)))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert hat_basis(np.float32([knots[3]]), knots, 3)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 knots"):
        law_knots(1)


def test_unpaired_fit_recovers_a_non_monotone_law():
    """Two phantoms of different shape: the law is found from unpaired volumes, fat brighter than muscle and bone."""
    sources = [phantom(48, 0.0, SOURCE), phantom(40, 0.05, SOURCE)]
    targets = [phantom(44, -0.04, TRUE_LAW), phantom(52, 0.02, TRUE_LAW)]
    law = fit_intensity_law(sources, targets, "mr", "mr", voxel_mm=2.0, knots=21, spacing_mm=2.0,
                            scales_mm=(0.0, 3.0, 8.0), samples=3000, restarts=8, iterations=150, seed=0)
    found = {name: float(law(np.float32([v]))[0]) for name, v in SOURCE.items()}
    assert found["fat"] > found["muscle"] + 0.5 and found["fat"] > found["bone"] + 0.5, found
    assert abs(found["fat"] - TRUE_LAW["fat"]) < 0.3 and abs(found["muscle"] - TRUE_LAW["muscle"]) < 0.3, found
    assert len(law.restarts) == 8 and law.distance <= 1.1 * min(law.restarts)  # finalists go on from the screen
    again = fit_intensity_law(sources, targets, "mr", "mr", voxel_mm=2.0, knots=21, spacing_mm=2.0,
                              scales_mm=(0.0, 3.0, 8.0), samples=3000, restarts=8, iterations=150, seed=0)
    np.testing.assert_array_equal(law.values, again.values)  # seeded: the same law
    record = json.loads(json.dumps(law.to_dict()))
    assert record["source"] == "mr" and len(record["values"]) == 21
    assert record["noise"] >= 0 and record["bias"] >= 0  # the fitted degradation amplitudes
    assert IntensityLaw.from_dict(record).bias == pytest.approx(record["bias"])


def test_degrading_the_law_output_makes_the_true_law_closer_to_a_noisy_target():
    """The fit compares a degraded law output with the target: for a target that is the true law plus white noise,
    the true law measured with that noise is much closer than measured bare, so the fit need not bend the law to
    make up the noise's spread (issue 13)."""
    rng = np.random.default_rng(0)
    on_knots = {"air": -1.0, "fat": -0.1, "muscle": 0.1, "bone": 0.6}  # every tissue on a knot: the law is exact
    sources = [phantom(48, 0.0, on_knots), phantom(40, 0.05, on_knots)]
    targets = [v + rng.normal(0.0, 0.1, v.shape).astype(np.float32)  # the same bodies: only the noise differs
               for v in (phantom(48, 0.0, TRUE_LAW), phantom(40, 0.05, TRUE_LAW))]
    knots = law_knots(21)
    true = np.interp(knots, sorted(on_knots.values()), [TRUE_LAW[k] for k in sorted(on_knots, key=on_knots.get)])

    def measured(noise: float) -> float:
        law = fit_intensity_law(sources, targets, "mr", "mr", voxel_mm=2.0, knots=21, spacing_mm=2.0,
                                scales_mm=(0.0, 3.0, 8.0), samples=3000, restarts=1, iterations=0, seed=0,
                                starts=[true], noise=noise, degradation=False)
        return law.restarts[1]  # [identity, the given start]

    assert measured(0.1) < 0.5 * measured(0.0)


def test_relative_features_do_not_see_a_smooth_receive_bias():
    """A +-15 % smooth bias moves the raw intensity features of a phantom MR by tenths; the log-ratios of the
    relative features hardly move, and the gradient over the widest blur moves less than half as much as the raw one."""
    clean = phantom(48, 0.0, TRUE_LAW)
    x = np.linspace(-0.5, 0.5, 48, dtype=np.float32)
    biased = (clean + 1.0) * np.exp(0.3 * x)[None, None, :] - 1.0  # a ramp along x: exp(+-0.15)
    mask = clean > -0.9

    def features(volume: np.ndarray) -> torch.Tensor:
        rows = target_features(volume, mask, 2.0, (0.0, 3.0, 8.0), 1.5, 4000, np.random.default_rng(0))
        return torch.from_numpy(rows)

    raw_clean, raw_biased = features(clean), features(biased)
    rel_clean, rel_biased = relative_features(raw_clean, 3), relative_features(raw_biased, 3)
    raw_change = (raw_biased - raw_clean).abs().mean(0)
    rel_change = (rel_biased - rel_clean).abs().mean(0)
    assert raw_change[:2].min() > 0.05, raw_change  # the voxel and its 3 mm blur: fat moves by about 0.2
    assert rel_change[:2].max() < 0.2 * raw_change[:2].min(), (rel_change, raw_change)
    assert rel_change[3] < 0.5 * raw_change[3], (rel_change, raw_change)  # the gradient: less than half
    torch.testing.assert_close(rel_clean[:, 2], raw_clean[:, 2])  # the widest blur is kept as it is
    with pytest.raises(ValueError, match="two blur scales"):
        relative_features(raw_clean[:, [0, 3]], 1)


def test_relative_features_apply_to_mr_targets_only():
    """MR -> CT: a CT has no receive field, so ``relative`` changes nothing; CT -> MR: it changes the distances."""
    mr = [phantom(40, 0.0, TRUE_LAW)]
    ct = [phantom(40, 0.05, SOURCE)]

    def distances(source: list, target: list, modalities: tuple[str, str], relative: bool) -> list[float]:
        return fit_intensity_law(source, target, *modalities, voxel_mm=2.0, knots=11, spacing_mm=2.0,
                                 scales_mm=(0.0, 3.0, 8.0), samples=2000, restarts=2, iterations=0, seed=0,
                                 relative=relative).restarts

    assert distances(mr, ct, ("mr", "ct"), True) == distances(mr, ct, ("mr", "ct"), False)
    shuffled = fit_intensity_law(ct, mr, "ct", "mr", voxel_mm=2.0, knots=11, spacing_mm=2.0, scales_mm=(8.0, 0.0, 3.0),
                                 samples=2000, restarts=2, iterations=0, seed=0).restarts
    assert shuffled == distances(ct, mr, ("ct", "mr"), True)  # the widest blur is the reference in any order
    assert distances(ct, mr, ("ct", "mr"), True) != distances(ct, mr, ("ct", "mr"), False)


def test_fit_refuses_empty_or_non_3d_input():
    with pytest.raises(ValueError, match="at least one source"):
        fit_intensity_law([], [np.zeros((8, 8, 8), np.float32)])
    with pytest.raises(ValueError, match=r"\(z, y, x\) volumes"):
        fit_intensity_law([np.zeros((8, 8), np.float32)], [np.zeros((8, 8, 8), np.float32)], "mr", "mr")


def test_intensity_curve_starts_near_identity_and_takes_a_law():
    curve = IntensityCurve(5)
    knots = torch.linspace(-1, 1, 5).reshape(1, 1, 5, 1, 1)
    np.testing.assert_allclose(torch.tanh(curve(knots)).detach().flatten(), [-0.96, -0.5, 0.0, 0.5, 0.96],
                               atol=1e-5)
    curve.set_values([0.9, -0.2, 0.0, 0.3, -0.6])
    np.testing.assert_allclose(torch.tanh(curve(knots)).detach().flatten(), [0.9, -0.2, 0.0, 0.3, -0.6], atol=1e-5)
    middle = torch.tanh(curve(torch.full((1, 1, 1, 1, 1), -0.75))).item()  # halfway between the first two knots
    assert -0.2 < middle < 0.9
    with pytest.raises(ValueError, match="5 knots, got 3"):
        curve.set_values([0.0, 0.1, 0.2])
    generator = ResnetGenerator3D(base_channels=2, n_blocks=1, law_knots=5)
    generator.set_intensity_law([0.9, -0.2, 0.0, 0.3, -0.6])
    with torch.no_grad():  # the ResNet branch starts at zero: the generator is the law
        out = generator(torch.full((1, 1, 8, 8, 8), -0.5))
    assert out.flatten()[0].item() == pytest.approx(-0.2, abs=1e-5)
    with pytest.raises(ValueError, match="no intensity curve"):
        ResnetGenerator3D(base_channels=2, n_blocks=1).set_intensity_law([0.0, 1.0])
    with pytest.raises(ValueError, match="law_knots"):
        ResnetGenerator3D(base_channels=2, n_blocks=1, law_knots=1)


def test_law_preset_needs_a_curve_of_matching_knots():
    with pytest.raises(ValueError, match="law_knots=81"):
        load_config("law", ["model.generator.extra.law_knots=0"])


def test_training_starts_the_curves_at_the_fitted_laws(tmp_path):
    """The trainer fits G's law and starts F at its inverse before step 1, records both and a step-0 snapshot, and
    the model loads."""
    need(HEART_CT, ABDOMEN_MR)
    config = load_config("law", [
        "model.generator.base_channels=2", "model.discriminator.base_channels=2", "model.generator.n_blocks=1",
        "data.patch_size=[32,32,32]", "train.device=cpu", "train.val_every=0", f'data.ct=["{HEART_CT}"]',
        f'data.mr=["{ABDOMEN_MR}"]', "train.steps=1", "train.threads=1", "train.snapshot_every=1",
        "model.law.restarts=2", "model.law.iterations=20", "model.law.samples=2000", "model.law.spacing_mm=4"])
    path = train_run(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "intensity_law.json").read_text())
    assert set(record) == {"G", "F"} and record["G"]["source"] == "ct" and len(record["G"]["values"]) == 81
    assert (tmp_path / "run" / "intensity_law.png").stat().st_size > 1000
    step0 = load_checkpoint(tmp_path / "run" / "snapshots" / "step_00000000.safetensors")
    curve = torch.tanh(step0.G.law.values.detach()).numpy()
    np.testing.assert_allclose(curve, np.clip(record["G"]["values"], -0.96, 0.96), atol=1e-4)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["elapsed_s"] >= record["G"]["seconds"] + record["F"]["seconds"]  # the fit counts in the budget
    with torch.no_grad():
        assert load_checkpoint(path).G(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 1, 32, 32, 32)


TINY_LAW = ["model.generator.base_channels=2", "model.discriminator.base_channels=2", "model.generator.n_blocks=1",
            "data.patch_size=[32,32,32]", "train.device=cpu", "train.val_every=0"]


def test_curve_learning_rate_scale_keeps_or_slows_the_fitted_law():
    """model.law.lr_scale=0: GAN steps leave the curve at its law while the ResNet branch learns; 0.1: the curve's
    group runs at a tenth of lr_G, also under the wall-clock schedule."""
    seed_everything(0)
    frozen = CycleGANTrainer(load_config("law", TINY_LAW + ["model.law.lr_scale=0"]), torch.device("cpu"))
    frozen.G.set_intensity_law(np.linspace(1.0, -1.0, 81))  # an inverted law, far from the identity start
    curve = frozen.G.law.values.detach().clone()
    rest = {n: p.detach().clone() for n, p in frozen.G.named_parameters() if not n.startswith("law.")}
    g = torch.Generator().manual_seed(0)
    frozen.train_step({"ct": torch.rand(1, 1, 32, 32, 32, generator=g) * 2 - 1,
                       "mr": torch.rand(1, 1, 32, 32, 32, generator=g) * 2 - 1})
    assert torch.equal(frozen.G.law.values, curve)
    assert any(not torch.equal(p, rest[n]) for n, p in frozen.G.named_parameters() if n in rest)
    slow = CycleGANTrainer(load_config("law", TINY_LAW + ["model.law.lr_scale=0.1"]), torch.device("cpu"))
    groups = slow.opt_g.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"])
    assert sum(p.numel() for p in groups[1]["params"]) == 2 * 81  # G's and F's curves, nothing else
    slow.follow_clock(0.9)
    assert groups[1]["lr"] == pytest.approx(0.1 * groups[0]["lr"]) and groups[0]["lr"] < slow.config.train.lr_g
    one = load_config("law", TINY_LAW + ["model.law.lr_scale=1"])  # the curves train with everything else
    assert len(CycleGANTrainer(one, torch.device("cpu")).opt_g.param_groups) == 1


def test_wide_blurs_on_a_coarse_grid_match_the_full_grid_blur():
    """blurred_at: the coarse-grid blur (sigma >= 4 voxels) of a speckled hat map (the worst case: detail finer than
    the coarse grid aliases) follows the full-grid Gaussian at the sampled voxels far more closely than a blur of
    the wrong width does; a narrow blur is the full-grid one exactly, an unblurred feature the voxel itself."""
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=(96, 96, 96)).astype(np.float32), 2.0)
    volume /= np.abs(volume).max()
    phi = hat_basis(volume, law_knots(41), 20)  # sharp-edged, like the fit's features
    # voxels at least 2.5 sigma from the faces (there the edge padding and scipy's reflection differ)
    index = np.ravel_multi_index(rng.integers(25, 71, size=(3, 4000)), volume.shape)
    for sigma in (4.0, 10.0):
        exact = ndimage.gaussian_filter(phi, sigma).ravel()[index]
        coarse = blurred_at(phi, sigma, index)
        assert np.corrcoef(coarse, exact)[0, 1] > 0.99
        assert np.abs(coarse - exact).mean() < 0.1 * exact.std()
        wider = ndimage.gaussian_filter(phi, 1.5 * sigma).ravel()[index]  # the check can tell a wrong width
        assert np.abs(wider - exact).mean() > 0.3 * exact.std()
    np.testing.assert_array_equal(blurred_at(phi, 1.5, index), ndimage.gaussian_filter(phi, 1.5).ravel()[index])
    np.testing.assert_array_equal(blurred_at(phi, 0.0, index), phi.ravel()[index])


def test_noise_estimate_finds_white_noise_under_smooth_anatomy():
    """estimate_noise_sigma: within 10 % of the sigma of white noise added to a smooth field, near 0 without it."""
    rng = np.random.default_rng(0)
    smooth = ndimage.gaussian_filter(rng.normal(size=(48, 48, 48)), 4.0) * 20.0
    mask = np.ones(smooth.shape, bool)
    assert estimate_noise_sigma(smooth + rng.normal(0.0, 0.05, smooth.shape), mask) == pytest.approx(0.05, rel=0.1)
    assert estimate_noise_sigma(smooth, mask) < 0.01
    assert estimate_noise_sigma(smooth, np.zeros(smooth.shape, bool)) == 0.0


def test_law_anchor_penalises_what_the_resnet_branch_adds():
    """curve_output is G without its ResNet branch (equal at the zero-initialised start), and model.law.anchor adds
    |G(x) - C_G(x)| + |F(y) - C_F(y)| to the generators' loss: zero at the start, positive once R has learnt."""
    seed_everything(0)
    trainer = CycleGANTrainer(load_config("law", TINY_LAW + ["model.law.anchor=5", "model.law.anchor_f=5"]),
                              torch.device("cpu"))
    trainer.G.set_intensity_law(np.linspace(1.0, -1.0, 81))
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(trainer.G(x), trainer.G.curve_output(x))
    batch = {"ct": x, "mr": x.flip(2)}
    first = trainer.train_step(batch)
    assert first["law_anchor"] == pytest.approx(0.0, abs=1e-6)
    second = trainer.train_step(batch)
    assert second["law_anchor"] > 0
    assert second["law_anchor"] == pytest.approx(second["law_anchor_G"] + second["law_anchor_F"], rel=1e-5)
    with torch.no_grad():  # anchor_f: F's half has its own weight (0: G alone is anchored)
        fake_mr, fake_ct = trainer.G(x), trainer.F(x.flip(2))
        terms = {}
        both = trainer._anchor_terms(x, x.flip(2), fake_mr, fake_ct, terms)
        assert float(both) == pytest.approx(5 * float(terms["law_anchor"]), rel=1e-5)
        trainer.config.model.law.anchor_f = 0.0
        alone = trainer._anchor_terms(x, x.flip(2), fake_mr, fake_ct, terms)
        assert float(alone) == pytest.approx(5 * float(terms["law_anchor_G"]), rel=1e-5)
        assert float(terms["law_anchor_F"]) > 0 and float(alone) < float(both)
    with pytest.raises(ValueError, match="per-voxel path"):
        ResnetGenerator3D(base_channels=2, n_blocks=0).curve_output(x)


def test_low_pass_anchor_spares_fine_detail_and_holds_the_tissue_level():
    """model.law.anchor_sigma_mm: a checkerboard deviation from the law (noise texture, edges) costs a tiny fraction
    of what it costs voxel by voxel, a uniform offset (a wrong tissue intensity) costs the same."""
    trainer = CycleGANTrainer(load_config("law", TINY_LAW + ["model.law.anchor_sigma_mm=2"]), torch.device("cpu"))
    low_pass = trainer._anchor_filter(2.0)
    index = torch.arange(24)
    checker = ((index[:, None, None] + index[None, :, None] + index[None, None, :]) % 2 * 2 - 1).float()
    checker = 0.1 * checker[None, None]
    offset = torch.full((1, 1, 24, 24, 24), 0.1)
    assert low_pass(checker).abs().mean() < 0.01 * checker.abs().mean()
    torch.testing.assert_close(low_pass(offset).abs().mean(), offset.abs().mean())
    assert low_pass(offset).shape == (1, 1, 24 - 12, 24 - 12, 24 - 12)  # 'valid': 2 x ceil(3 sigma) voxels less
    assert trainer._anchor_filter(0.0)(checker) is checker


def test_law_settings_are_checked():
    with pytest.raises(ValueError, match="anchor_sigma_mm"):
        load_config("law", ["model.law.anchor_sigma_mm=-1"])
    with pytest.raises(ValueError, match="does not fit in data.patch_size"):  # a 49-voxel window in a 48-voxel patch
        load_config("law", ["model.law.anchor_sigma_mm=8", "data.patch_size=[48,48,48]"])
    load_config("law", ["model.law.anchor_sigma_mm=7.5", "data.patch_size=[48,48,48]"])  # 47 voxels: accepted
    with pytest.raises(ValueError, match="anchor"):
        load_config("law", ["model.law.anchor=-1"])
    with pytest.raises(ValueError, match="anchor_f"):
        load_config("law", ["model.law.anchor_f=-1"])
    with pytest.raises(ValueError, match="lr_scale"):
        load_config("law", ["model.law.lr_scale=-1"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config("law", ["model.law.file=/nonexistent/intensity_law.json"])


def test_a_run_can_start_from_an_earlier_runs_laws(tmp_path):
    """model.law.file: the laws are read, not fitted (no fit time), recorded again, and the curves start there."""
    need(HEART_CT, ABDOMEN_MR)
    knots = law_knots(81)
    given = {"G": {"source": "ct", "target": "mr", "knots": knots.tolist(), "values": (-knots).tolist(),
                   "distance": 0.5, "restarts": [], "seconds": 0.0},
             "F": {"source": "mr", "target": "ct", "knots": knots.tolist(), "values": (0.5 * knots).tolist(),
                   "distance": 0.5, "restarts": [], "seconds": 0.0}}
    (tmp_path / "laws.json").write_text(json.dumps(given))
    assert read_intensity_laws(tmp_path / "laws.json")["F"].values[-1] == pytest.approx(0.5)
    config = load_config("law", TINY_LAW + [f'data.ct=["{HEART_CT}"]', f'data.mr=["{ABDOMEN_MR}"]', "train.steps=1",
                                            "train.threads=1", "train.snapshot_every=1",
                                            f"model.law.file={tmp_path / 'laws.json'}",
                                            "model.law.f_start=fit"])  # F from the file, not G's inverse
    train_run(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "intensity_law.json").read_text())
    np.testing.assert_allclose(record["G"]["values"], -knots, atol=1e-5)
    step0 = load_checkpoint(tmp_path / "run" / "snapshots" / "step_00000000.safetensors")
    np.testing.assert_allclose(torch.tanh(step0.F.law.values.detach()).numpy(), 0.5 * knots, atol=1e-4)
    (tmp_path / "bad.json").write_text(json.dumps({"G": given["G"]}))
    with pytest.raises(ValueError, match="'G' and 'F'"):
        read_intensity_laws(tmp_path / "bad.json")


def test_inverse_law_undoes_a_one_to_one_law_and_averages_what_a_law_merges():
    """inverse_intensity_law: E[x | law(x)] as a curve. A one-to-one law is undone to within 0.02; where |x| merges
    +v and -v (equally frequent) the inverse is their mean 0, where only +v exists it is +v."""
    rng = np.random.default_rng(0)
    volume = np.full((40, 40, 40), -1.0, np.float32)
    volume[4:36, 4:36, 4:36] = rng.uniform(-0.4, 0.8, (32, 32, 32))
    knots = law_knots(41)
    one_to_one = IntensityLaw(knots, 0.5 * knots + 0.3, 0.0)
    inverse = inverse_intensity_law(one_to_one, [volume], spacing_mm=1.0)
    assert inverse.source == "mr" and inverse.target == "ct" and len(inverse.values) == 41
    inside = volume[volume > -0.9]
    assert np.abs(inverse(one_to_one(inside)) - inside).mean() < 0.02
    merged = inverse_intensity_law(IntensityLaw(knots, np.abs(knots), 0.0), [volume], spacing_mm=1.0)
    assert abs(float(merged(np.float32(0.2)))) < 0.05
    assert float(merged(np.float32(0.6))) == pytest.approx(0.6, abs=0.03)
    assert merged.distance > 10 * inverse.distance  # what no per-voxel inverse can undo
    with pytest.raises(ValueError, match="at least one"):
        inverse_intensity_law(one_to_one, [])
    with pytest.raises(ValueError, match="f_start"):
        load_config("law", ["model.law.f_start=guess"])


def test_f_can_start_at_the_inverse_of_gs_law(tmp_path):
    """model.law.f_start=inverse: F's curve starts at inverse_intensity_law of G's law (here G's from a file, a
    decreasing law, whose inverse is itself; the file's own F is not used), with no MR -> CT fit."""
    need(HEART_CT, ABDOMEN_MR)
    knots = law_knots(81)
    law = {"source": "ct", "target": "mr", "knots": knots.tolist(), "values": (-knots).tolist(), "distance": 0.5}
    given_f = {**law, "source": "mr", "target": "ct", "values": (0.5 * knots).tolist()}  # f_start overrides it
    (tmp_path / "laws.json").write_text(json.dumps({"G": law, "F": given_f}))
    config = load_config("law", TINY_LAW + [f'data.ct=["{HEART_CT}"]', f'data.mr=["{ABDOMEN_MR}"]', "train.steps=1",
                                            "train.threads=1", f"model.law.file={tmp_path / 'laws.json'}",
                                            "model.law.f_start=inverse"])
    train_run(config, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "intensity_law.json").read_text())
    assert record["F"]["source"] == "mr" and record["F"]["seconds"] < 30
    middle = np.abs(knots) <= 0.3
    np.testing.assert_allclose(np.asarray(record["F"]["values"])[middle], -knots[middle], atol=0.05)
