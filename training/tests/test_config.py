"""Configuration of `ct2mr train`: presets (thesis Table 4 and the seed papers), overrides, validation."""

from __future__ import annotations

import pytest

from ct2mr.training.config import (ADVERSARIAL_HEADS, RunConfig, list_presets, load_config, preset_path,
                          shorthand_overrides, split_overrides, to_yaml)

# preset -> (generator, norm, adversarial head, alpha, beta, lambda_hist, spectral norm, optimiser, paired)
PRESETS = {
    "m1": ("resnet", "instance", "lsgan", 0.0, 0.0, 0.0, False, "adam", False),
    "m2": ("resnet", "instance", "wgan-gp", 0.0, 0.0, 0.0, False, "adam", False),
    "m3": ("unetpp", "instance", "wgan-gp", 0.1, 0.0, 0.0, False, "adam", False),
    "m4": ("resnet", "instance", "bce", 0.1, 0.5, 0.0, True, "adam", False),
    "hist": ("resnet", "instance", "lsgan", 0.0, 0.0, 1.0, False, "adam", False),
    "hlsnc": ("resnet", "switchable", "hinge", 0.0, 0.0, 0.0, False, "rmsprop", False),
    "paired": ("resnet", "instance", "lsgan", 0.0, 0.0, 0.0, False, "adam", True),
}
PAIRS = ['data.paired_ct=["a.nii.gz"]', 'data.paired_mr=["b.nii.gz"]']
# issue 13 presets beside the thesis's: preset -> (lambda_mind, lambda_nce, pointwise path, CT window)
STRUCTURE_PRESETS = {
    "sc": (2.0, 0.0, 16, [-1000.0, 1000.0]),
    "nce": (0.0, 1.0, 16, [-1000.0, 1000.0]),
}


def test_every_bundled_preset_is_listed_and_described_here():
    assert sorted(list_presets()) == sorted([*PRESETS, *STRUCTURE_PRESETS, "law"])


def test_law_preset_starts_at_a_fitted_law_without_histogram_or_identity_terms():
    config = load_config("law")
    m = config.model
    assert config.preset == "law" and m.law.enabled and m.generator.extra == {"pointwise": 0, "law_knots": 81}
    assert m.law.knots == 81 and m.law.anchor == 10.0 and m.law.degradation
    assert m.law.anchor_f == 0.0 and m.law.f_start == "inverse"  # G alone anchored; F starts at G's inverse
    assert (m.lambda_hist, m.lambda_id, m.lambda_mind, m.lambda_cyc) == (0.0, 0.0, 2.0, 10.0)
    assert list(config.data.preprocessing["ct_window"]) == [-1000.0, 1000.0]


@pytest.mark.parametrize("name", sorted(STRUCTURE_PRESETS))
def test_structure_presets_keep_the_protocol_and_add_their_terms(name):
    mind, nce, pointwise, window = STRUCTURE_PRESETS[name]
    config = load_config(name)
    m = config.model
    assert config.preset == name and config.name == f"ct2mr-{name}"
    assert (m.lambda_mind, m.lambda_nce, m.generator.extra.get("pointwise")) == (mind, nce, pointwise)
    assert list(config.data.preprocessing["ct_window"]) == window
    assert (m.lambda_cyc, m.lambda_id, m.adversarial, config.train.lr_g) == (10.0, 0.2, "lsgan", 2e-4)
    assert "#" in preset_path(name).read_text().splitlines()[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_the_thesis_table(name):
    gen, norm, head, alpha, beta, hist, sn, opt, paired = PRESETS[name]
    config = load_config(name, PAIRS if paired else [])
    m = config.model
    assert config.preset == name and config.name == f"ct2mr-{name}"
    assert (m.generator.name, m.generator.norm, m.adversarial) == (gen, norm, head)
    assert (m.alpha, m.beta, m.lambda_hist, m.discriminator.spectral_norm) == (alpha, beta, hist, sn)
    assert (config.train.optimizer, m.paired.enabled) == (opt, paired)
    # thesis section 7.1 / Table 4 shared protocol, unless the paper says otherwise
    assert (m.lambda_cyc, m.lambda_id) == (10.0, 0.2)
    assert (config.train.lr_g, config.train.lr_d, config.train.pool_size) == (2e-4, 2e-4, 50)
    assert m.generator.n_blocks == 9 or m.generator.name != "resnet"
    assert "#" in preset_path(name).read_text().splitlines()[0], "each preset starts with a comment citing its source"


def test_m1_is_the_default_and_yaml_round_trips(tmp_path):
    config = load_config()
    assert config == load_config("m1")
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    assert load_config(base=tmp_path / "config.yaml") == config


def test_overrides_apply_in_order_with_types():
    config = load_config("m3", ["model.alpha=0.84", "train.steps=100", "data.patch_size=[48,48,48]",
                                "train.steps=120", "model.generator.extra={dropout: 0.1}"])
    assert config.model.alpha == 0.84 and config.train.steps == 120 and config.patch_size == (48, 48, 48)
    assert config.model.generator.to_spec() == {"name": "unetpp", "base_channels": 32, "norm": "instance",
                                                "depth": 4, "dropout": 0.1}


def test_generator_spec_keeps_only_the_keys_of_its_architecture():
    resnet = load_config("m1").model.generator.to_spec()
    assert resnet == {"name": "resnet", "base_channels": 64, "norm": "instance", "n_blocks": 9}
    d = load_config("m4").model.discriminator
    assert d.to_spec() == {"name": "patchgan", "base_channels": 64, "n_layers": 3, "norm": "instance",
                           "spectral_norm": True}
    assert d.to_spec(in_channels=2)["in_channels"] == 2
    assert "spectral_norm" not in load_config("m1").model.discriminator.to_spec()  # loadable by older engines


@pytest.mark.parametrize("override, match", [
    ("model.alpah=0.1", "alpah"),
    ("train.steps=abc", "train.steps"),
    ("model.adversarial=vanilla", "lsgan, wgan-gp, hinge, bce"),
    ("model.generator.name=vit", "resnet, unet, unetpp"),
    ("model.generator.norm=group", "instance, batch, layer, switchable, none"),
    ("model.hist_distance=kl", "w1, l2"),
    ("train.optimizer=adamw", "adam, rmsprop, sgd"),
    ("train.precision=fp8", "auto, fp32, bf16, fp16"),
    ("data.balance=weighted", "none, volume, source"),
    ("data.patch_size=[30,30,30]", "multiples of 4"),
    ("data.patch_size=[16,16,16]", "at least 32"),
    ("train.freeze_d_every=2", None),  # valid alone
    ("model.rician.tau=1.5", "tau"),
    ("model.beta=0.9", r"\[0.3, 0.7\]"),
    ("train.device=tpu", "auto, cpu, cuda"),
    ("noequals", "KEY=VALUE"),
])
def test_bad_values_are_refused_up_front_naming_what_is_allowed(override, match):
    if match is None:
        load_config("m1", [override])
        return
    with pytest.raises(ValueError, match=match):
        load_config("m1", [override])


def test_cross_field_checks():
    with pytest.raises(ValueError, match="multiples of 16"):
        load_config("m3", ["data.patch_size=[40,40,40]"])  # U-Net++ depth 4
    with pytest.raises(ValueError, match="freeze_d_steps"):
        load_config("m1", ["train.freeze_d_every=2", "train.freeze_d_steps=2"])
    with pytest.raises(ValueError, match="paired_ct"):
        load_config("paired")
    with pytest.raises(ValueError, match="decay_start"):
        load_config("m1", ["train.steps=10", "train.decay_start=11"])
    with pytest.raises(ValueError, match="Unknown preset 'm9'"):
        load_config("m9")


def test_presets_can_extend_each_other(tmp_path):
    (tmp_path / "mine.yaml").write_text("extends: hist\nname: mine\nmodel:\n  lambda_hist: 2.0\n")
    config = load_config(str(tmp_path / "mine.yaml"))
    assert (config.name, config.model.lambda_hist, config.model.adversarial) == ("mine", 2.0, "lsgan")
    (tmp_path / "loop.yaml").write_text(f"extends: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ValueError, match="extends itself"):
        load_config(str(tmp_path / "loop.yaml"))


def test_shorthand_flags_map_to_overrides():
    overrides = shorthand_overrides(steps=5, width=8, patch_size=[48], lr=1e-4, ct=["a b.nii.gz"], device="cpu",
                                    paired_ct=["p.nii"], paired_mr=["q.nii"], blocks=None)
    assert overrides[:2] == ["train.steps=5", "model.generator.base_channels=8"]
    config = load_config("m1", overrides)
    assert config.model.discriminator.base_channels == 8 and config.patch_size == (48, 48, 48)
    assert (config.train.lr_g, config.train.lr_d, config.train.device) == (1e-4, 1e-4, "cpu")
    assert config.data.ct == ["a b.nii.gz"] and config.model.paired.enabled
    with pytest.raises(ValueError, match="Unknown shorthand"):
        shorthand_overrides(widht=3)


def test_overrides_swallowed_by_path_flags_are_recovered():
    assert split_overrides(["a.nii.gz", "model.alpha=0.3", "b=c.nii"]) == (["a.nii.gz", "b=c.nii"],
                                                                          ["model.alpha=0.3"])


def test_every_adversarial_head_of_the_losses_is_configurable():
    from ct2mr import losses

    for head in set(ADVERSARIAL_HEADS) | set(losses.ADVERSARIAL_HEADS):
        assert load_config("m1", [f"model.adversarial={head}"]).model.adversarial == head


def test_to_dict_is_json_ready_and_complete():
    d = RunConfig().to_dict()
    assert set(d) == {"name", "preset", "description", "model", "data", "train"}
    assert d["data"]["preprocessing"]["ct_window"] == [-600.0, 1000.0]
