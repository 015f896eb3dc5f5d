"""Config validation: every bad value is named with its fix."""

import pytest

from hf_sae import HierarchicalSAEConfig, KronSAEConfig, SAEConfigError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_in": 0}, "d_in must be a positive integer"),
        ({"d_sae": -4}, "d_sae must be a positive integer"),
        ({"k": 0}, "k must be a positive integer"),
        ({"d_sae": 16, "k": 32}, "k=32 is larger than d_sae=16"),
        ({"budgets": [0, 4]}, r"budgets \[0\] are outside 1..k=64"),
        ({"budgets": [8, 128]}, r"budgets \[128\] are outside"),
        ({"budgets": [8, 8]}, "duplicates"),
        ({"budgets": []}, "empty"),
        ({"hook_site": "residual"}, "hook_site='residual' is not a known site"),
        ({"hook_layer": -1}, "hook_layer must be an integer >= 0"),
        ({"activation_scale": 0.0}, "activation_scale must be a finite number > 0"),
        ({"auxk_k": 0}, "auxk_k must be a positive integer"),
        ({"sparsity": 3}, r"unknown argument\(s\) \['sparsity'\]"),
    ],
)
def test_invalid_hierarchical_configs(kwargs, message):
    with pytest.raises(SAEConfigError, match=message):
        HierarchicalSAEConfig(**kwargs)


def test_kron_factors_must_multiply_to_d_sae():
    with pytest.raises(SAEConfigError, match=r"4\*2\*4 = 32 != d_sae=64"):
        KronSAEConfig(d_in=16, d_sae=64, num_heads=4, base_dim=2, ext_dim=4, k=8)
    with pytest.raises(SAEConfigError, match="not a multiple of base_dim\\*ext_dim"):
        KronSAEConfig(d_in=16, d_sae=60, base_dim=2, ext_dim=4, k=8)
    with pytest.raises(SAEConfigError, match="kron_activation"):
        KronSAEConfig(d_in=16, num_heads=4, k=8, kron_activation="gelu")
    cfg = KronSAEConfig(d_in=16, d_sae=64, base_dim=2, ext_dim=4, k=8)
    assert cfg.num_heads == 8
    assert KronSAEConfig(d_in=16, num_heads=4, base_dim=4, ext_dim=8, k=8).d_sae == 128


def test_defaults_and_derived_values():
    cfg = HierarchicalSAEConfig(d_in=640, d_sae=4096, k=32, budgets=[16, 4, 32])
    assert cfg.budgets == [4, 16, 32] and cfg.budget_list == [4, 16, 32]
    assert cfg.auxk_k_effective == 320
    assert HierarchicalSAEConfig(d_in=8, d_sae=8, k=2).budget_list == [1, 2]
    assert cfg.model_type == "hierarchical_sae" and KronSAEConfig().model_type == "kron_sae"
