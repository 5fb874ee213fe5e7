"""FOPConfig validation: every invalid hyperparameter names the field, the value and the valid range."""

import pytest
from torch import nn

from hf_fop import FOP, FOPConfig
from hf_fop.config import default_factor_interval

INVALID = [
    ("lr", -0.1, r"\[0.0, inf\)"),
    ("lr", float("nan"), "a number"),
    ("lr", "0.1", "a number"),
    ("damping", 0.0, r"\(0.0, inf\)"),
    ("damping", -1e-3, r"\(0.0, inf\)"),
    ("mode", "sgd", "one of"),
    ("fisher_type", "exact", "one of"),
    ("momentum", 1.0, r"\[0.0, 1.0\)"),
    ("momentum", -0.5, r"\[0.0, 1.0\)"),
    ("weight_decay", -1.0, r"\[0.0, inf\)"),
    ("factor_decay", 1.0, r"\[0.0, 1.0\)"),
    ("factor_interval", 0, "integer >= 1"),
    ("factor_interval", 2.5, "integer >= 1"),
    ("inverse_interval", 0, "integer >= 1"),
    ("eps", -1e-12, r"\[0.0, inf\)"),
    ("use_eta", 1, "True or False"),
    ("use_beta", "yes", "True or False"),
    ("adamw_lr", -1.0, r"\[0.0, inf\)"),
    ("adamw_betas", (0.9,), "a pair"),
    ("adamw_betas", (0.9, 1.0), "a pair"),
    ("adamw_eps", 0.0, r"\(0.0, inf\)"),
    ("adamw_weight_decay", -0.1, r"\[0.0, inf\)"),
    ("max_factor_dim", 0, "integer >= 1"),
    ("exclude_modules", (1,), "fnmatch patterns"),
    ("exclude_types", ("Linear",), "module classes"),
    ("max_eigh_failures", 0, "integer >= 1"),
    ("kl_clip", 0.0, r"None \(no trust region\) or a number in \(0, inf\)"),
    ("kl_clip", -1e-3, r"None \(no trust region\) or a number in \(0, inf\)"),
    ("kl_clip", float("inf"), r"None \(no trust region\) or a number in \(0, inf\)"),
    ("kl_clip", "1e-3", r"None \(no trust region\) or a number"),
    ("damping_mode", "scaled", "one of"),
    ("curvature_sharding", "sharded", r"one of \('replicated', 'specialists'\)"),
    ("projection_metric", "euclidean", r"one of \(.damped., .fisher.\)"),
    ("stagger_capture", "yes", r"None \(on unless fisher_type='mc'\), True or False"),
]


@pytest.mark.parametrize("field,value,valid", INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_value_names_field_value_and_range(field, value, valid):
    with pytest.raises(ValueError, match=rf"FOPConfig\.{field}=.*invalid: expected .*{valid}"):
        FOPConfig(**{field: value})
    with pytest.raises(ValueError, match=rf"FOPConfig\.{field}="):
        FOP(nn.Linear(2, 2), **{field: value})


def test_inverse_interval_must_be_a_multiple_of_factor_interval():
    with pytest.raises(ValueError, match="inverse_interval=5 is invalid: expected a positive multiple of factor_interval=2"):
        FOPConfig(factor_interval=2, inverse_interval=5)
    assert FOPConfig(factor_interval=5, inverse_interval=10).inverse_interval == 10


@pytest.mark.parametrize("inverse, factor", [(20, 10), (5, 5), (12, 6), (7, 7), (30, 10), (100, 10), (1, 1)])
def test_an_unset_factor_interval_is_the_largest_divisor_of_the_inverse_interval_up_to_10(inverse, factor):
    assert default_factor_interval(inverse) == factor
    assert FOPConfig(inverse_interval=inverse).factor_interval == factor
    assert FOPConfig().replace(inverse_interval=inverse).factor_interval == factor  # follows through replace()
    assert FOP(nn.Linear(2, 2), inverse_interval=inverse).config.factor_interval == factor


def test_a_given_factor_interval_is_kept_by_replace():
    cfg = FOPConfig(factor_interval=10).replace(momentum=0.5)
    assert cfg.replace(inverse_interval=30).factor_interval == 10
    with pytest.raises(ValueError, match="inverse_interval=5 is invalid: expected a positive multiple of factor_interval=10"):
        cfg.replace(inverse_interval=5)
    assert FOPConfig().factor_interval == 10 and FOPConfig().inverse_interval == 20


def test_replace_validates_and_normalises():
    cfg = FOPConfig(exclude_modules="classifier", exclude_types=nn.LayerNorm, adamw_lr=None)
    assert cfg.exclude_modules == ("classifier",) and cfg.exclude_types == (nn.LayerNorm,)
    assert cfg.replace(lr=0.5).lr == 0.5 and cfg.replace(lr=0.5).exclude_types == (nn.LayerNorm,)
    assert cfg.effective_adamw_lr == cfg.lr and cfg.replace(adamw_lr=1e-3).effective_adamw_lr == 1e-3
    with pytest.raises(ValueError, match="FOPConfig.damping"):
        cfg.replace(damping=0)
    with pytest.raises(TypeError, match="no field"):
        cfg.replace(dampening=0.1)


@pytest.mark.parametrize(
    "fisher_type,given,staggered",
    [("empirical", None, True), ("mc", None, False), ("mc", True, True), ("empirical", False, False)],
)
def test_staggered_capture_is_on_unless_the_mc_fisher_would_sample_every_step(fisher_type, given, staggered):
    config = FOPConfig(fisher_type=fisher_type, stagger_capture=given)
    assert config.staggers_capture is staggered
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    slots = FOP(model, config.replace(factor_interval=2, inverse_interval=2))._plan.capture_slots
    assert sorted(slots) == ([0, 1] if staggered else [0, 0])
