"""FOPTrainingArguments: CLI flags through HfArgumentParser, validation, the derived FOPConfig."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_fop import FOPConfig, FOPTrainingArguments, parse_fop_args


def test_is_training_arguments_with_documented_fop_fields():
    assert issubclass(FOPTrainingArguments, TrainingArguments)
    fop_fields = [f for f in dataclasses.fields(FOPTrainingArguments) if f.name.startswith("fop_")]
    assert len(fop_fields) >= 12
    assert all(f.metadata.get("help") for f in fop_fields)


def test_cli_flags_parse(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--fop_damping", "3e-2", "--fop_optimizer", "kfac", "--fop_use_beta", "false",
        "--fop_factor_interval", "2", "--fop_inverse_interval", "4", "--fop_exclude_modules", "classifier", "lm_head",
        "--learning_rate", "0.2", "--fop_adamw_lr", "1e-3", "--fop_fisher_type", "mc",
    ])
    config = args.fop_config()
    assert (config.damping, config.mode, config.use_beta) == (3e-2, "kfac", False)
    assert (config.factor_interval, config.inverse_interval, config.fisher_type) == (2, 4, "mc")
    assert config.exclude_modules == ("classifier", "lm_head")
    assert (config.lr, config.adamw_lr) == (0.2, 1e-3)


def test_trust_region_and_damping_mode_flags_parse_and_validate(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--fop_kl_clip", "1e-3", "--fop_damping_mode", "relative"]
    )
    config = args.fop_config()
    assert (config.kl_clip, config.damping_mode) == (1e-3, "relative")
    defaults = FOPTrainingArguments(str(tmp_path)).fop_config()  # the shipped defaults: trust region on
    assert (defaults.kl_clip, defaults.damping_mode, defaults.damping) == (1e-3, "absolute", 1e-2)
    (paper,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_kl_clip", "0"])
    assert (paper.fop_config().kl_clip, paper.fop_config().damping_mode) == (None, "absolute")  # the paper's setting
    with pytest.raises(ValueError, match=r"FOPTrainingArguments\.fop_kl_clip=-1.0 is invalid"):
        FOPTrainingArguments(str(tmp_path), fop_kl_clip=-1.0)
    with pytest.raises(ValueError, match=r"FOPTrainingArguments\.fop_damping_mode='scaled' is invalid"):
        FOPTrainingArguments(str(tmp_path), fop_damping_mode="scaled")


def test_projection_metric_flag_reaches_the_config(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_projection_metric", "fisher"])
    assert args.fop_config().projection_metric == "fisher"
    assert FOPTrainingArguments(str(tmp_path)).fop_config().projection_metric == "damped"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_projection_metric", "euclidean"])
    with pytest.raises(ValueError, match=r"FOPTrainingArguments\.fop_projection_metric='euclidean' is invalid: expected one of"):
        FOPTrainingArguments(str(tmp_path), fop_projection_metric="euclidean")


def test_block_refresh_from_the_command_line_reaches_the_config(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_block_refresh", "round"])
    assert args.fop_config().block_refresh == "round"
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_block_refresh", "adaptive",
                                                  "--fop_block_tolerance", "0.03"])  # fmt: skip
    assert (args.fop_config().block_refresh, args.fop_config().block_tolerance) == ("adaptive", 0.03)
    default = FOPTrainingArguments(str(tmp_path)).fop_config()
    assert (default.block_refresh, default.block_tolerance) == (FOPConfig().block_refresh, FOPConfig().block_tolerance)
    assert (FOPConfig().block_refresh, FOPConfig().block_tolerance) == ("adaptive", 0.05)


def test_trainer_fields_reach_the_config(tmp_path):
    args = FOPTrainingArguments(str(tmp_path), weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-6)
    config = args.fop_config()
    assert config.weight_decay == config.adamw_weight_decay == 0.1
    assert config.adamw_betas == (0.8, 0.999) and config.adamw_eps == 1e-6


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("fop_damping", 0.0, r"fop_damping=0.0 is invalid: expected a number in \(0.0, inf\)"),
        ("fop_factor_decay", 1.0, r"fop_factor_decay=1.0 is invalid: expected a number in \[0.0, 1.0\)"),
        ("fop_momentum", -0.1, r"fop_momentum=-0.1 is invalid"),
        ("fop_factor_interval", 0, r"fop_factor_interval=0 is invalid: expected an integer >= 1"),
        ("fop_inverse_interval", 3, r"fop_inverse_interval=3 is invalid: expected a positive multiple of factor_interval=2"),
        ("fop_fisher_type", "exact", r"fop_fisher_type='exact' is invalid"),
        ("fop_optimizer", "sgd", r"fop_optimizer='sgd' is invalid: expected one of \('fop', 'kfac', 'trainer'\)"),
        ("fop_adamw_lr", -1.0, r"fop_adamw_lr=-1.0 is invalid"),
        ("fop_max_factor_dim", 0, r"fop_max_factor_dim=0 is invalid"),
        ("fop_block_refresh", "jacobi", r"fop_block_refresh='jacobi' is invalid: expected one of \('sweep', 'round', "
         r"'adaptive'\)"),
        ("fop_block_tolerance", -0.01, r"fop_block_tolerance=-0.01 is invalid: expected a number in \[0.0, inf\)"),
    ],
)
def test_invalid_values_fail_at_construction(tmp_path, field, value, message):
    extra = {"fop_factor_interval": 2} if field == "fop_inverse_interval" else {}
    with pytest.raises(ValueError, match=message):
        FOPTrainingArguments(str(tmp_path), **{field: value}, **extra)


def test_cli_rejects_unknown_choice(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_optimizer", "adam"])


def test_deepspeed_configuration_is_rejected_with_the_limitation(tmp_path):
    ds = {"train_batch_size": "auto", "zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="FOPTrainingArguments.deepspeed is set, but FOP does not support DeepSpeed yet"):
        FOPTrainingArguments(output_dir=str(tmp_path), deepspeed=ds, use_cpu=True)
    with pytest.raises(ValueError, match="fop_optimizer='trainer'"):
        FOPTrainingArguments(output_dir=str(tmp_path), deepspeed=ds, fop_optimizer="kfac", use_cpu=True)


# ------------------------------------------------------------------ large-batch recipe
def test_lr_scales_linearly_with_the_global_batch(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "True", "--learning_rate", "0.01", "--fop_adamw_lr", "1e-3",
        "--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "4", "--fop_scale_lr_with_batch", "128",
    ])
    assert args.global_train_batch_size == 256  # 64 x 4 x 1 process
    assert args.effective_learning_rate == pytest.approx(0.02)
    assert args.fop_config().lr == pytest.approx(0.02) and args.fop_config().adamw_lr == pytest.approx(2e-3)
    # the arguments keep what was given: a copy (dataclasses.replace runs __post_init__ again) does not scale twice
    assert (args.learning_rate, args.fop_adamw_lr) == (0.01, 1e-3)
    again = dataclasses.replace(args)
    assert again.fop_config().lr == pytest.approx(0.02) and again.fop_config().adamw_lr == pytest.approx(2e-3)
    plain = FOPTrainingArguments(
        str(tmp_path), use_cpu=True, learning_rate=0.01, fop_adamw_lr=None, per_device_train_batch_size=64
    )
    assert plain.effective_learning_rate == 0.01 and plain.fop_config().adamw_lr is None


@pytest.mark.parametrize("batch, interval", [(32, 1), (511, 1), (512, 2), (1024, 3), (2048, 4), (4095, 4), (4096, 5), (65536, 5)])
def test_paper_curvature_schedule_grows_with_batch_up_to_five(tmp_path, batch, interval):
    from hf_fop.integrations.arguments import paper_curvature_interval

    assert paper_curvature_interval(batch) == interval
    args = FOPTrainingArguments(str(tmp_path), use_cpu=True, per_device_train_batch_size=batch, fop_curvature_schedule="paper")
    assert args.curvature_intervals == (interval, interval)
    config = args.fop_config()
    assert config.factor_interval == config.inverse_interval == interval
    assert dataclasses.replace(args).curvature_intervals == (interval, interval)


def test_an_interval_given_with_the_paper_schedule_is_an_error_naming_both_flags(tmp_path):
    with pytest.raises(ValueError, match=r"fop_curvature_schedule='paper'.*fop_inverse_interval=7.*drop fop_inverse_interval"):
        FOPTrainingArguments(str(tmp_path), use_cpu=True, fop_curvature_schedule="paper", fop_inverse_interval=7)
    with pytest.raises(ValueError, match=r"fop_factor_interval=1 and fop_inverse_interval=5"):
        FOPTrainingArguments(str(tmp_path), use_cpu=True, fop_curvature_schedule="paper", fop_factor_interval=1,
                             fop_inverse_interval=5)


@pytest.mark.parametrize("given, expected", [
    (dict(fop_inverse_interval=50), (10, 50)),  # the factor interval: the largest divisor up to 10
    (dict(fop_inverse_interval=5), (5, 5)),
    (dict(fop_inverse_interval=12), (6, 12)),
    (dict(fop_factor_interval=1, fop_inverse_interval=50), (1, 50)),
    (dict(fop_factor_interval=2), (2, 20)),
    (dict(), (10, 20)),
])
def test_fixed_curvature_schedule_keeps_the_given_intervals(tmp_path, given, expected):
    args = FOPTrainingArguments(str(tmp_path), use_cpu=True, per_device_train_batch_size=4096, **given)
    assert args.curvature_intervals == expected
    assert (args.fop_config().factor_interval, args.fop_config().inverse_interval) == expected


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("fop_scale_lr_with_batch", 0, r"fop_scale_lr_with_batch=0 is invalid: expected an integer >= 1"),
        ("fop_scale_lr_with_batch", 1.5, r"fop_scale_lr_with_batch=1.5 is invalid"),
        ("fop_curvature_schedule", "linear", r"fop_curvature_schedule='linear' is invalid: expected one of \('fixed', 'paper'\)"),
    ],
)
def test_large_batch_fields_are_validated(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        FOPTrainingArguments(str(tmp_path), use_cpu=True, **{field: value})


@pytest.mark.parametrize(
    "flags,line",
    [
        (["--fop_damping", "0"], "error: argument --fop_damping: fop_damping=0.0 is invalid: expected a number in (0.0, inf)"),
        (["--fop_factor_interval", "2", "--fop_inverse_interval", "3"],
         "error: argument --fop_inverse_interval: fop_inverse_interval=3 is invalid: expected a positive multiple"),
    ],
)
def test_parse_fop_args_reports_a_range_error_in_one_line(tmp_path, capsys, flags, line):
    """A real HfArgumentParser: argparse's exit status 2 and one error line on stderr, no traceback."""
    parser = HfArgumentParser(FOPTrainingArguments)
    base = ["--output_dir", str(tmp_path), "--use_cpu"]
    with pytest.raises(SystemExit) as exit_info:
        parse_fop_args(parser, base + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], err
    (args,) = parse_fop_args(parser, base + ["--fop_damping", "0.5"])
    assert args.fop_damping == 0.5


def test_parse_fop_args_keeps_other_errors(tmp_path):
    """Errors that are not FOPTrainingArguments' own validation propagate unchanged."""
    parser = HfArgumentParser(FOPTrainingArguments)
    with pytest.raises(ValueError, match="torch_empty_cache_steps"):
        parse_fop_args(parser, ["--output_dir", str(tmp_path), "--use_cpu", "--torch_empty_cache_steps", "-1"])


def test_curvature_sharding_flag_reaches_the_config(tmp_path):
    parser = HfArgumentParser(FOPTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fop_curvature_sharding", "specialists"])
    assert args.fop_config().curvature_sharding == "specialists"
    assert FOPTrainingArguments(str(tmp_path)).fop_config().curvature_sharding == "replicated"
    with pytest.raises(ValueError, match=r"FOPTrainingArguments\.fop_curvature_sharding='sharded' is invalid: expected one of"):
        FOPTrainingArguments(str(tmp_path), fop_curvature_sharding="sharded")
