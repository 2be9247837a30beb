"""Evaluation: metric correctness (FID, KID, SSIM-3D, PSNR, MAE, W1, t-test), feature extractors, patch sampling,
and `ct2mr evaluate` / `ct2mr compare` end to end on small crops of real shared volumes."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ct2mr.evaluation.evaluate import (PER_VOLUME_COLUMNS, TABLE_COLUMNS, EvaluationConfig, compare, evaluate, extract_patches,
                              sample_patch_corners)
from ct2mr.evaluation.metrics import (fid, frechet_distance, histogram_w1, intensity_histogram, kid, mae, mmd2_unbiased,
                                      paired_ttest, psnr, ssim3d)
from ct2mr.evaluation.features import MedicalNetFeatures, RandomConv3DFeatures, build_feature_extractor, resolve_weights
from ct2mr.io.sampledata import ChecksumError

from ct2mr_testdata import ABDOMEN_MR, CARDIAC_MR, CARDIAC_MR_4D, HEART_CT, need, run_ct2mr


# --- FID ----------------------------------------------------------------------------------------------------------

def test_fid_of_identical_feature_sets_is_zero():
    feats = np.random.default_rng(0).standard_normal((200, 16))
    assert fid(feats, feats) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mu1, s1, mu2, s2", [
    ([0.0], [1.0], [3.0], [4.0]),                        # 1D: (m1 - m2)^2 + (sd1 - sd2)^2 = 9 + 1
    ([0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 1.0, 0.0], [4.0, 2.0, 0.5]),
])
def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form(mu1, s1, mu2, s2):
    mu1, s1, mu2, s2 = (np.asarray(v, float) for v in (mu1, s1, mu2, s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def _sqrtm_spd(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_full_covariances_matches_the_symmetric_form():
    # tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the symmetric closed form, with eigendecompositions only
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 5)), rng.standard_normal((5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    r1 = _sqrtm_spd(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * _sqrtm_spd(r1 @ s2 @ r1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal([0, 0, 0], [1, 2, 3], size=(40000, 3))
    b = rng.normal([1, 0, -1], [2, 2, 1], size=(40000, 3))
    expected = 2 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert fid(a, b) == pytest.approx(expected, rel=0.03)
    assert math.isnan(fid(a[:1], b))


# --- KID ----------------------------------------------------------------------------------------------------------

def _mmd2_reference(x, y):
    """The unbiased MMD^2 written out term by term (O(n^2) loops), kernel (a.b/d + 1)^3."""
    d = x.shape[1]
    k = lambda p, q: (float(np.dot(p, q)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_direct_unbiased_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 6)), rng.standard_normal((30, 6)) + 0.5
    expected = _mmd2_reference(x, y)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    mean, std = kid(x, y, n_subsets=5, subset_size=100)  # subsets cover both sets: one exact draw
    assert mean == pytest.approx(expected, rel=1e-10) and math.isnan(std)


def test_kid_averages_subsets_drawn_without_replacement():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((40, 4))
    mean, std = kid(x, y, n_subsets=7, subset_size=10, seed=9)
    draws = np.random.default_rng(9)
    values = [_mmd2_reference(x[draws.choice(50, 10, replace=False)], y[draws.choice(40, 10, replace=False)])
              for _ in range(7)]
    assert mean == pytest.approx(np.mean(values), rel=1e-9) and std == pytest.approx(np.std(values), rel=1e-9)


def test_kid_is_unbiased_for_samples_of_one_distribution():
    rng = np.random.default_rng(5)
    values, biased = [], []
    for _ in range(400):
        x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 3))
        values.append(mmd2_unbiased(x, y))
        kxx, kyy = (x @ x.T / 3 + 1) ** 3, (y @ y.T / 3 + 1) ** 3
        biased.append(kxx.mean() + kyy.mean() - 2 * ((x @ y.T / 3 + 1) ** 3).mean())  # V-statistic
    se = np.std(values) / np.sqrt(len(values))
    assert abs(np.mean(values)) < 4 * se          # expectation 0
    assert np.mean(biased) > 10 * se              # the biased estimator is clearly positive
    assert min(values) < 0                        # an unbiased estimate can be negative


# --- SSIM, PSNR, MAE ----------------------------------------------------------------------------------------------

def _smooth_volume(seed, shape=(24, 28, 30)):
    rng = np.random.default_rng(seed)
    volume = torch.from_numpy(rng.uniform(-1, 1, shape))[None, None]
    return torch.nn.functional.avg_pool3d(volume, 3, 1, 1)[0, 0].numpy()


def test_ssim3d_of_identical_volumes_is_one():
    a = _smooth_volume(0)
    assert ssim3d(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim3d(a, a, mask=a > 0) == pytest.approx(1.0, abs=1e-12)


def test_ssim3d_agrees_with_monai():
    from monai.metrics import SSIMMetric
    from monai.metrics.regression import compute_ssim_and_cs

    a = _smooth_volume(1)
    b = np.clip(a + np.random.default_rng(2).normal(0, 0.1, a.shape), -1, 1)
    ta, tb = (torch.from_numpy(v).float()[None, None] for v in (a, b))
    reference = float(SSIMMetric(spatial_dims=3, data_range=2.0)(ta, tb).item())
    assert ssim3d(a, b, data_range=2.0) == pytest.approx(reference, abs=1e-5)
    # masked: the mean of MONAI's SSIM map over the mask, cropped by half a window like the map
    ssim_map = compute_ssim_and_cs(ta, tb, 3, [11] * 3, [1.5] * 3, 2.0)[0][0, 0].numpy()
    mask = np.zeros(a.shape, bool)
    mask[4:20, 6:25, 3:27] = True
    inner = mask[5:-5, 5:-5, 5:-5]
    assert ssim3d(a, b, 2.0, mask) == pytest.approx(float(ssim_map[inner].mean()), abs=1e-5)
    assert ssim3d(a, b) < 0.99


def test_ssim3d_rejects_mismatching_shapes_and_tiny_volumes():
    with pytest.raises(ValueError, match="same shape"):
        ssim3d(np.zeros((12, 12, 12)), np.zeros((12, 12, 13)))
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim3d(np.zeros((8, 12, 12)), np.zeros((8, 12, 12)))


def test_psnr_and_mae_match_hand_values():
    a, b = np.zeros((4, 4, 4)), np.full((4, 4, 4), 0.1)
    assert mae(a, b) == pytest.approx(0.1)
    assert psnr(a, b, data_range=2.0) == pytest.approx(10 * math.log10(4 / 0.01))  # 26.0206 dB
    b[0] = 1.1  # outside the mask
    mask = np.ones(a.shape, bool)
    mask[0] = False
    assert mae(a, b, mask) == pytest.approx(0.1) and psnr(a, b, 2.0, mask) == pytest.approx(26.0206, abs=1e-4)
    assert mae(a, b) == pytest.approx((0.1 * 48 + 1.1 * 16) / 64)
    assert psnr(a, a) == float("inf")
    # PSNR on [-1, 1] with range 2 equals PSNR in HU with the window width as range
    hu = lambda v: (v + 1) * 800 - 600  # noqa: E731
    x, y = _smooth_volume(3), _smooth_volume(4)
    assert psnr(x, y, 2.0) == pytest.approx(psnr(hu(x), hu(y), 1600.0))


# --- Histogram distance -------------------------------------------------------------------------------------------

def test_histogram_w1_is_the_shift_between_distributions():
    a = intensity_histogram(np.full(100, -0.5 + 1 / 256))
    b = intensity_histogram(np.full(100, 0.25 + 1 / 256))
    assert histogram_w1(a, b) == pytest.approx(0.75, abs=1e-12)
    assert histogram_w1(a, a) == 0.0
    assert math.isnan(histogram_w1(a, np.zeros_like(a)))


def test_histogram_w1_matches_scipy_on_bin_centres():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(6)
    centres = np.linspace(-1, 1, 257)[:-1] + 1 / 256
    u, v = rng.choice(centres, 5000), np.clip(rng.choice(centres, 5000) * 0.5 + 0.2, -1, 1)
    v = centres[np.clip(np.searchsorted(centres, v), 0, 255)]
    assert histogram_w1(intensity_histogram(u), intensity_histogram(v)) == pytest.approx(wasserstein_distance(u, v),
                                                                                          abs=1e-9)


# --- Paired t-test ------------------------------------------------------------------------------------------------

def test_paired_ttest_matches_hand_values():
    # d = [1, 1, 2, 2]: mean 1.5, sd sqrt(1/3), t = 1.5 / (sqrt(1/3) / 2) = 5.196152
    result = paired_ttest([1, 2, 3, 4], [0, 1, 1, 2])
    t = 1.5 / (math.sqrt(1 / 3) / 2)
    # Student t CDF with 3 degrees of freedom in closed form
    cdf = 0.5 + (math.atan(t / math.sqrt(3)) + (t / math.sqrt(3)) / (1 + t * t / 3)) / math.pi
    assert result["t"] == pytest.approx(t, rel=1e-9)
    assert result["p"] == pytest.approx(2 * (1 - cdf), rel=1e-6)  # 0.01385
    assert result["n"] == 4 and result["mean_diff"] == pytest.approx(1.5)
    assert math.isnan(paired_ttest([1.0], [2.0])["p"])
    with pytest.raises(ValueError, match="same length"):
        paired_ttest([1, 2], [1])


# --- Patches and features -----------------------------------------------------------------------------------------

def test_patch_corners_are_reproducible_inside_the_mask_and_fit():
    mask = np.zeros((40, 50, 60), bool)
    mask[10:30, 20:40, 5:55] = True
    a = sample_patch_corners(mask, 20, 16, np.random.default_rng([0, 0, 3]))
    b = sample_patch_corners(mask, 20, 16, np.random.default_rng([0, 0, 3]))
    assert np.array_equal(a, b) and a.shape == (20, 3)
    centres = a + 8
    assert mask[tuple(centres.T)].all()
    assert (a >= 0).all() and (a + 16 <= np.array(mask.shape)).all()
    assert len({tuple(c) for c in a}) == 20  # without replacement
    volume = np.arange(mask.size, dtype=np.float32).reshape(mask.shape)
    patches = extract_patches(volume, a, 16)
    assert patches.shape == (20, 1, 16, 16, 16)
    z, y, x = a[0]
    assert torch.equal(patches[0, 0], torch.from_numpy(volume[z:z + 16, y:y + 16, x:x + 16]))


def test_random_features_are_deterministic_and_identified():
    patches = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (5, 1, 32, 32, 32)).astype(np.float32))
    a, b, c = RandomConv3DFeatures(seed=0), RandomConv3DFeatures(seed=0), RandomConv3DFeatures(seed=1)
    assert a.identity == b.identity and a.identity["weights_sha256"] != c.identity["weights_sha256"]
    fa = a(patches)
    assert fa.shape == (5, 120) and fa.dtype == np.float64
    assert np.array_equal(fa, b(patches)) and not np.allclose(fa, c(patches))
    with pytest.raises(ValueError, match="features must be one of"):
        build_feature_extractor("inception")


def _medicalnet_like(path, as_safetensors=False):
    from monai.networks.nets import resnet10

    torch.manual_seed(0)
    net = resnet10(spatial_dims=3, n_input_channels=1, shortcut_type="B", bias_downsample=False,
                   feed_forward=False).eval()
    if as_safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:  # MedicalNet's own layout: {"state_dict": {"module.<key>": tensor}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, str(path))
    return net


@pytest.mark.parametrize("as_safetensors", [False, True], ids=["pth", "safetensors"])
def test_medicalnet_features_load_from_a_local_file(tmp_path, as_safetensors):
    path = tmp_path / ("w.safetensors" if as_safetensors else "resnet_10_23dataset.pth")
    net = _medicalnet_like(path, as_safetensors)
    extractor = MedicalNetFeatures(path)
    patches = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (3, 1, 32, 32, 32)).astype(np.float32))
    with torch.no_grad():
        expected = net(patches).double().numpy()
    assert extractor.dim == 512 and np.allclose(extractor(patches), expected, atol=1e-5)
    assert extractor.identity["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_or_wrong_weights_give_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface.*--feature-weights PATH"):
        resolve_weights(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="No MedicalNet ResNet-10 weights"):
        build_feature_extractor("medicalnet")
    with pytest.raises(ValueError, match="--feature-sha256"):
        resolve_weights("https://example.org/w.pth")
    (tmp_path / "w.pth").write_bytes(b"abc")
    with pytest.raises(ChecksumError, match="expected 00"):
        resolve_weights(tmp_path / "w.pth", "00" * 32)
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="does not fit MedicalNet"):
        MedicalNetFeatures(tmp_path / "other.pth")


@pytest.fixture()
def weights_server(http_server):
    """The local HTTP server of conftest.py, serving one file."""
    url, root = http_server
    (root / "weights.pth").write_bytes(bytes(range(256)) * 64)
    return url, root


def test_weights_download_once_into_the_cache_with_good_checksum(weights_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CT2MR_CACHE", str(tmp_path / "cache"))
    url, root = weights_server
    sha = hashlib.sha256((root / "weights.pth").read_bytes()).hexdigest()
    path = resolve_weights(f"{url}/weights.pth", sha)
    assert path.parent == tmp_path / "cache" / "weights" and path.read_bytes() == (root / "weights.pth").read_bytes()
    (root / "weights.pth").unlink()  # second call: from the cache, no request
    assert resolve_weights(f"{url}/weights.pth", sha) == path


def test_weights_download_with_bad_checksum_keeps_nothing(weights_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CT2MR_CACHE", str(tmp_path / "cache"))
    url, _ = weights_server
    with pytest.raises(ChecksumError):
        resolve_weights(f"{url}/weights.pth", "f" * 64)
    assert not any((tmp_path / "cache" / "weights").iterdir())


# --- Masks --------------------------------------------------------------------------------------------------------

def test_ct_body_mask_holds_the_lungs_and_not_the_outside_air():
    need(HEART_CT)
    from ct2mr.preprocessing.masks import body_mask

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(HEART_CT))).astype(np.float32)
    mask = body_mask(hu, "ct", normalised=False)
    assert 0.2 < mask.mean() < 1.0
    assert (hu[mask] < -500).any()                 # lung parenchyma is inside the body
    assert not mask[hu < -990].all()


# --- Real data: identity vs histogram matching --------------------------------------------------------------------

@pytest.mark.slow
def test_identity_copy_scores_worse_than_histogram_matching_on_real_data():
    """Copying the CT as 'synthetic MR' vs histogram-matching it to one real MR, scored against another real MR."""
    need(HEART_CT, CARDIAC_MR, CARDIAC_MR_4D)
    from ct2mr.inference.harmonization import fit_harmonizer
    from ct2mr.io.images import read_image, read_volumes
    from ct2mr.preprocessing.masks import evaluation_mask
    from ct2mr.preprocessing.pipeline import preprocess

    ct = preprocess(read_image(HEART_CT), "ct")
    reference = preprocess(read_image(CARDIAC_MR), "mr")                       # phase 1
    target = preprocess(read_volumes(CARDIAC_MR_4D, select=[10])[0][1], "mr")  # phase 11: another volume
    ct_mask = evaluation_mask(ct.array, "ct", ct.record)
    ref_mask = evaluation_mask(reference.array, "mr", reference.record)
    real = intensity_histogram(target.array[evaluation_mask(target.array, "mr", target.record)])
    identity = histogram_w1(intensity_histogram(ct.array[ct_mask]), real)
    matched = fit_harmonizer("histogram", [reference.array], [ref_mask]).apply(ct.array, ct_mask)
    histogram = histogram_w1(intensity_histogram(matched[ct_mask]), real)
    print(f"W1 to real MR: identity copy {identity:.4f}, histogram matching {histogram:.4f}")
    assert histogram < 0.5 * identity


# --- ct2mr evaluate / compare end to end --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    """A tiny in-process checkpoint and small crops of real volumes (written to a temporary folder)."""
    need(HEART_CT, ABDOMEN_MR)
    from ct2mr.models.checkpoint import save_checkpoint
    from ct2mr.networks import build_generator
    from ct2mr.preprocessing.pipeline import PreprocessingConfig

    root = tmp_path_factory.mktemp("eval_inputs")
    spec = {"name": "resnet", "base_channels": 2, "n_blocks": 1, "norm": "instance"}
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(save_checkpoint(root / f"tiny{seed}.safetensors",
                                      {"G": build_generator(spec), "F": build_generator(spec)},
                                      {"generator": spec, "discriminator": {}}, PreprocessingConfig(),
                                      {"roi_size": [32, 32, 32]}, {"name": f"tiny{seed}"}))
    ct = sitk.ReadImage(str(HEART_CT))
    # 21^3 voxels of 1.5 mm and 10^3 voxels of 3 mm: 32^3 network grids, one 32^3 window per pass
    sitk.WriteImage(ct[30:51, 30:51, 40:61], str(root / "ct_a.nii.gz"))
    sitk.WriteImage(ct[55:76, 45:66, 50:71], str(root / "ct_b.nii.gz"))
    mr = sitk.ReadImage(str(ABDOMEN_MR))
    sitk.WriteImage(mr[30:40, 30:40, 5:15], str(root / "mr_a.nii.gz"))
    sitk.WriteImage(mr[50:60, 30:40, 5:15], str(root / "mr_b.nii.gz"))
    return {"models": models, "ct": [str(root / "ct_a.nii.gz"), str(root / "ct_b.nii.gz")],
            "mr": [str(root / "mr_a.nii.gz"), str(root / "mr_b.nii.gz")], "root": root}


FAST = dict(patches_per_volume=8, patch_size=16, kid_subsets=5, kid_subset_size=8)


def test_evaluate_writes_the_thesis_tables(small_inputs, tmp_path):
    config = EvaluationConfig(**FAST, figures=False, tensorboard=False, harmonize=("histogram",))
    seen = []
    result = evaluate(small_inputs["models"][0], small_inputs["ct"], small_inputs["mr"], tmp_path / "eval", config,
                      progress=lambda stage, fraction, message: seen.append(fraction))
    assert seen[-1] == 1.0 and seen == sorted(seen)
    names = {p.name for p in result.files}
    assert {"table.csv", "table.md", "per_volume.csv", "per_volume.md", "metrics.json"} <= names
    assert "| " + " | ".join(TABLE_COLUMNS) + " |" in result.markdown
    rows = {(r["variant"], r["direction"]): r for r in result.aggregate}
    assert set(rows) == {("model", "CT→MR"), ("model+histogram", "CT→MR"), ("identity", "CT→MR"),
                         ("identity+histogram", "CT→MR"), ("model", "MR→CT")}
    model = rows[("model", "CT→MR")]
    assert model["volumes"] == 2 and model["patches"] == 16
    assert 0 < model["psnr_cyc_db"] < 60 and -1 <= model["ssim_cyc"] <= 1 and model["fid"] >= 0
    assert model["mae_hu"] == pytest.approx(model["mae"] * 800)
    assert rows[("model", "MR→CT")]["mae_hu"] is None
    # the evaluation MR set is the reference here: histogram matching must beat the raw copy on W1
    assert rows[("identity+histogram", "CT→MR")]["w1_pooled"] < rows[("identity", "CT→MR")]["w1_pooled"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    extractor = metrics["feature_extractor"]
    assert extractor["name"] == "random" and len(extractor["weights_sha256"]) == 64
    assert "uniformly at random" in metrics["patch_sampling"]
    assert [r["volume"] for r in metrics["per_volume"] if r["variant"] == "model"] == ["ct_a", "ct_b", "mr_a", "mr_b"]
    header = (tmp_path / "eval" / "per_volume.csv").read_text().splitlines()[0]
    assert header == ",".join(PER_VOLUME_COLUMNS)


def test_evaluate_refuses_bad_options_before_any_work(small_inputs, tmp_path):
    with pytest.raises(ValueError, match="features must be one of"):
        EvaluationConfig(features="inception")
    with pytest.raises(ValueError, match="harmonize must be among"):
        EvaluationConfig(harmonize=("gamma",))
    with pytest.raises(ValueError, match="--paired needs as many"):
        evaluate(small_inputs["models"][0], small_inputs["ct"], small_inputs["mr"][:1], tmp_path / "e",
                 EvaluationConfig(**FAST, paired=True))


@pytest.mark.slow
def test_evaluate_paired_figures_tensorboard_and_compare(small_inputs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for k, model in enumerate(small_inputs["models"]):
        # CT crops paired with themselves read as MR: registered by construction
        result = evaluate(model, small_inputs["ct"], small_inputs["ct"], tmp_path / f"run{k}",
                          EvaluationConfig(**FAST, paired=True))
        runs.append(tmp_path / f"run{k}")
    names = {p.name for p in result.files}
    assert {"paired.csv", "paired.md", "figure_data.npz", "triplanar_ct_a.png", "roundtrip_ct_a.png",
            "histogram_ct2mr.png", "histogram_mr2ct.png"} <= names
    assert len(result.paired) == 4 and {r["direction"] for r in result.paired} == {"CT→MR", "MR→CT"}
    for row in result.paired:
        assert row["voxels"] > 0 and 0 < row["psnr_db"]
        if row["direction"] == "MR→CT":
            assert row["mae_hu"] == pytest.approx(row["mae"] * 800)
    assert "Average ± SD" in (tmp_path / "run1" / "paired.md").read_text()
    events = EventAccumulator(str(tmp_path / "run1" / "tensorboard")).Reload()
    assert "CT2MR/model/fid" in events.Tags()["scalars"]
    assert "figures/histogram_ct2mr" in events.Tags()["images"]

    out = compare(runs, tmp_path / "cmp")
    assert {p.name for p in out["files"]} >= {"compare.csv", "compare.md", "ttests.csv", "compare_triplanar.png",
                                              "compare_histogram.png"}
    tests = {(t["direction"], t["metric"]): t for t in out["ttests"]}
    assert tests[("CT→MR", "ssim_cyc")]["n"] == 2 and ("MR→CT", "paired mae_hu") in tests
    assert {r["run"] for r in out["table"]} == {"tiny0", "tiny1"}


@pytest.mark.slow
def test_cli_evaluate_and_compare_end_to_end(small_inputs, tmp_path):
    model = str(small_inputs["models"][0])
    common = ["--patches-per-volume", "8", "--patch-size", "16", "--kid-subsets", "5", "--progress", "json"]
    proc = run_ct2mr("evaluate", "--model", model, "--ct", *small_inputs["ct"], "--mr", *small_inputs["mr"],
                     "--out", str(tmp_path / "a"), "--harmonize", "histogram", "nyul", "zscore", "--reference-mr",
                     small_inputs["mr"][0], "--no-tensorboard", *common, check=True)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events[-1]["event"] == "done" and any(e["event"] == "progress" for e in events)
    table = (tmp_path / "a" / "table.md").read_text()
    for label in ("tiny0 + histogram", "tiny0 + nyul", "tiny0 + zscore", "copy CT (identity)", "reference MR: mr_a"):
        assert label in table
    proc = run_ct2mr("compare", str(tmp_path / "a"), str(small_inputs["models"][1]), "--ct", *small_inputs["ct"],
                     "--mr", *small_inputs["mr"], "--out", str(tmp_path / "cmp"), "--no-figures", *common, check=True)
    assert (tmp_path / "cmp" / "runs" / "1_tiny1" / "metrics.json").is_file()
    assert "tiny1" in (tmp_path / "cmp" / "compare.md").read_text()
    proc = run_ct2mr("compare", str(tmp_path / "a"), "--out", str(tmp_path / "c2"), "--progress", "none")
    assert proc.returncode == 1 and "at least two runs" in proc.stderr
    proc = run_ct2mr("evaluate", "--model", model, "--ct", *small_inputs["ct"], "--mr", *small_inputs["mr"],
                     "--out", str(tmp_path / "m"), "--features", "medicalnet", "--progress", "none")
    assert proc.returncode == 1 and "--feature-weights" in proc.stderr
