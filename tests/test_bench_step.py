"""scripts/bench_step.py and scripts/profile_step.py run end to end on a tiny ViT and report sane figures.

Not a timing test: it checks the JSON contract (keys, ratios consistent with
the reported times, no skipped steps, state bytes that match the model) and
the argument errors.
"""

import json
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_fop import FOP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_step  # noqa: E402


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=ROOT,
    )


def test_smoke_run_reports_ratios_memory_and_sweep(tmp_path):
    plot = tmp_path / "growth.png"
    done = _run("bench_step.py", "--smoke", "--sweep", "--intervals", "2", "--plot", str(plot),
                "--json-out", str(tmp_path / "out.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "out.json").read_text())
    times = result["times"]
    assert set(times) == {"adamw", "adamw_full", "kfac", "fop"}
    for kind, t in times.items():
        assert 0 < t["step_s"] < 60, kind
        assert t["step_s"] == pytest.approx(t["passes_s"] + t["opt_step_s"], rel=0.5), kind
    assert result["fop_over_adamw"] == pytest.approx(times["fop"]["step_s"] / times["adamw"]["step_s"])
    assert result["fop_over_kfac"] == pytest.approx(times["fop"]["step_s"] / times["kfac"]["step_s"])
    assert result["kfac_over_adamw"] == pytest.approx(times["kfac"]["step_s"] / times["adamw"]["step_s"])
    for kind in ("kfac", "fop"):  # every timed cycle ran its eigendecomposition, no step was skipped
        assert times[kind]["skipped_steps"] == 0
        assert times[kind]["inverse_updates"] == result["cycles"] + 1
        assert times[kind]["eigh_s"] > 0
    # AdamW state: exp_avg + exp_avg_sq (float32) + one float32 step scalar per parameter tensor
    model = bench_step.build_model(bench_step.Shape(**result["shape"]), torch.device("cpu"))
    params = list(model.parameters())
    adamw_bytes = 2 * 4 * sum(p.numel() for p in params) + 4 * len(params)
    assert times["adamw"]["state_bytes"] == adamw_bytes
    assert times["fop"]["state_bytes"] > adamw_bytes  # + factors A, S and their eigenbases
    mem = result["memory"]
    assert all(mem[k]["peak_bytes"] > 0 for k in ("adamw", "kfac", "fop"))
    assert result["peak_fop_over_adamw"] == pytest.approx(mem["fop"]["peak_bytes"] / mem["adamw"]["peak_bytes"])
    assert result["fop_over_limit"] == pytest.approx(result["fop_over_adamw"] / (1 + result["rotation_limit_fop"]))
    assert result["rotation_limit_fop"] == pytest.approx(1.5 * result["rotation_limit_kfac"])  # 3 rotations against 2
    assert set(result["goals"]) == {"fop_over_adamw", "fop_over_kfac", "fop_over_limit", "peak_fop_over_adamw"}
    assert result["goals"]["fop_over_limit"] == {"goal": 1.15, "value": result["fop_over_limit"],
                                                 "met": result["fop_over_limit"] <= 1.15}  # fmt: skip
    assert {(p["batch"], p["interval"]) for p in result["sweep"]["batch"]} == {(b, k) for b in (4, 8) for k in (2,)}
    assert {(p["hidden"], p["interval"]) for p in result["sweep"]["hidden"]} == {(h, k) for h in (16, 32) for k in (2,)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compiled_smoke_run_reports_compiled_figures_next_to_eager(tmp_path):
    done = _run("bench_step.py", "--smoke", "--compile", "--compile-backend", "aot_eager", "--no-memory",
                "--json-out", str(tmp_path / "out.json"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["times"]) == {"adamw", "adamw_full", "kfac", "fop"}  # the eager headline is still there
    comp = result["compiled"]
    assert comp["backend"] == "aot_eager"
    times = comp["times"]
    assert set(times) == {"adamw", "kfac", "fop"}
    for kind, t in times.items():
        assert t["step_s"] > 0 and t["warmup_s"] > 0, kind
        assert t["timed_steps"] == result["cycles"] * result["interval"], kind  # the warm-up cycle is not timed
    # each optimizer in its own process, the timed steps round-robin: one step of each in turn
    assert len({t["pid"] for t in times.values()}) == 3
    order = [kind for _, kind in sorted((when, kind) for kind, t in times.items() for when in t["step_started"])]
    assert order == ["adamw", "kfac", "fop"] * (result["cycles"] * result["interval"])
    assert comp["fop_over_adamw"] == pytest.approx(times["fop"]["step_s"] / times["adamw"]["step_s"])
    assert comp["fop_over_kfac"] == pytest.approx(times["fop"]["step_s"] / times["kfac"]["step_s"])
    assert comp["kfac_over_adamw"] == pytest.approx(times["kfac"]["step_s"] / times["adamw"]["step_s"])
    for kind in ("kfac", "fop"):  # compiled, the optimizers still refresh every cycle and skip nothing
        assert times[kind]["skipped_steps"] == 0
        assert times[kind]["inverse_updates"] == result["cycles"] + 1
    # graphs: AdamW's model compiles whole; K-FAC's and FOP's disabled capture hooks split the forward at each managed
    # layer (at most L + 1 pieces, each in a static and a dynamic shape), all compiled in the warm-up cycle
    layers = len(bench_step.make_optimizer("fop", bench_step.build_model(bench_step.SMOKE["shape"],
                                                                         torch.device("cpu")), 2).layers)  # fmt: skip
    assert times["adamw"]["graphs"] == 1
    for kind in ("kfac", "fop"):
        assert 1 < times[kind]["graphs"] <= 2 * (layers + 1), (kind, times[kind]["graphs"], layers)
    assert all(t["timed_graphs"] == 0 for t in times.values())
    table = bench_step.markdown(result)
    for kind, t in times.items():
        eager = result["times"][kind]["step_s"]
        assert (f"| {kind} | {1e3 * eager:.1f} | {1e3 * t['step_s']:.1f} | {t['step_s'] / eager:.3f} | "
                f"{t['warmup_s']:.1f} | {t['graphs']} | 0 |") in table  # fmt: skip
    for key in ("fop_over_adamw", "fop_over_kfac", "kfac_over_adamw"):
        assert f"| {key} | {result[key]:.3f} | {comp[key]:.3f} |" in table
    del result["compiled"]
    assert "aot_eager" not in bench_step.markdown(result)


@pytest.mark.parametrize("new_shape_at,timed_graphs", [(1, 0), (2, 1)])
def test_compiled_timing_counts_the_graphs_compiled_after_the_warm_up_cycle(new_shape_at, timed_graphs, monkeypatch):
    # interval 2: steps 0 and 1 are the warm-up; a new batch size at step new_shape_at recompiles the model there
    make_step = bench_step.make_step

    def new_shape_from_step(kind, model, opt, x, y):  # noqa: ANN001, ANN202
        passes = [make_step(kind, model, opt, x, y), make_step(kind, model, opt, x[:2], y[:2])]
        calls = []

        def step() -> None:
            passes[len(calls) >= new_shape_at]()
            calls.append(1)

        return step

    compiled = []

    def backend(graph, example_inputs):  # noqa: ANN001, ANN202 (a dynamo backend that runs the graph as traced)
        compiled.append(graph)
        return graph.forward

    monkeypatch.setattr(bench_step, "make_step", new_shape_from_step)
    shape = bench_step.Shape(hidden=16, layers=1, batch=4, image=8, patch=4)
    runner = bench_step.CompiledRunner("adamw", shape, 2, 2, torch.device("cpu"), backend)  # as in its own process
    assert runner.warm_up() > 0
    for _ in range(2):
        runner.step()
    times = runner.summary()
    assert (times["graphs"], times["timed_graphs"], times["timed_steps"]) == (2, timed_graphs, 2)
    assert len(compiled) == 2  # the model went through the given backend


def test_rotation_limits_of_the_smoke_vit_by_hand():
    """The smoke ViT's managed layers (d_in with the bias column, d_out) written out; the passes' FLOPs counted by
    torch's FlopCounterMode over AdamW's two half-batch passes."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = bench_step.SMOKE["shape"]  # hidden 32, one block, MLP 128, 8 x 8 patches of 3 channels, 10 classes
    dims = [(3 * 8 * 8 + 1, 32)] + [(33, 32)] * 4 + [(33, 128), (129, 32), (33, 10)]
    one_each = sum(2 * d_in * d_out * (d_in + d_out) for d_in, d_out in dims)
    model = bench_step.build_model(shape, torch.device("cpu"))
    x, y = bench_step.make_batch(shape, torch.device("cpu"))
    passes = bench_step.make_step("adamw", model, bench_step.make_optimizer("adamw", model, 1), x, y)
    with FlopCounterMode(display=False) as counter:
        passes()
    flops = counter.get_total_flops()
    limits = bench_step.rotation_limits(shape, torch.device("cpu"))
    assert limits == {"rotation_limit_kfac": pytest.approx(2 * one_each / flops),
                      "rotation_limit_fop": pytest.approx(3 * one_each / flops)}  # fmt: skip


def test_state_bytes_counts_every_tensor_of_the_state_dict():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    assert bench_step.state_bytes(opt) == 0
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert bench_step.state_bytes(opt) == 2 * 4 * (6 + 2) + 2 * 4


def test_profile_attributes_time_to_phases():
    done = _run("profile_step.py", "--hidden", "32", "--layers", "1", "--batch", "8", "--interval", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    phases = result["ms_per_step"]
    for phase in ("passes", "capture_forward", "capture_backward", "refresh", "precondition"):
        assert sum(phases[phase].values()) > 0, phase
    assert phases["refresh"].get("eigh", 0) > 0
    assert phases["precondition"].get("mm", 0) > 0  # the rotations
    total = sum(sum(v.values()) for v in phases.values())
    assert result["total_ms_per_step"] == pytest.approx(total)
    assert result["factor_interval"] == 2
    _assert_factor_interval(result["layer_factor_updates"], result["layers"], steps=4, factor_interval=2)


def _assert_factor_interval(updates: int, layers: int, steps: int, factor_interval: int) -> None:
    """Over ``steps`` steps with the default staggered capture each layer updates its factors once per factor
    interval, plus once on the first step when its own step of the interval is a later one."""
    assert layers * steps // factor_interval <= updates < layers * (steps // factor_interval + 1)


def test_profile_takes_the_shipped_schedule_and_rejects_a_factor_interval_that_does_not_divide():
    done = _run("profile_step.py", "--hidden", "32", "--layers", "1", "--batch", "8", "--interval", "4",
                "--factor-interval", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["interval"], result["factor_interval"]) == (4, 2)
    _assert_factor_interval(result["layer_factor_updates"], result["layers"], steps=8, factor_interval=2)
    done = _run("profile_step.py", "--interval", "4", "--factor-interval", "3")
    assert done.returncode == 2 and "--factor-interval must be a divisor of --interval (4)" in done.stderr


@pytest.mark.parametrize(
    "args,message",
    [(["--batch", "7"], "--batch must be even"), (["--plot", "x.png"], "--plot needs --sweep"),
     (["--interval", "0"], "--interval must be an integer >= 1"),
     (["--interval", "20", "--factor-interval", "3"], "--factor-interval (3) must divide --interval (20)"),
     (["--compile", "--compile-backend", "nope"], "--compile-backend must be one of"),
     (["--compile-backend", "aot_eager"], "--compile-backend needs --compile")],
)  # fmt: skip
def test_bad_arguments_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit):
        bench_step.parse_args(args)
    assert message in capsys.readouterr().err


def test_compile_backend_defaults_to_inductor_with_compile_only():
    assert bench_step.parse_args(["--compile"]).compile_backend == "inductor"
    assert bench_step.parse_args(["--compile", "--compile-backend", "aot_eager"]).compile_backend == "aot_eager"
    assert bench_step.parse_args([]).compile_backend is None


def test_factor_interval_sets_the_capture_schedule_alone():
    # eigenbases every 4 steps, factors every 2: over the warm-up and one timed cycle (8 steps) FOP and K-FAC update
    # each layer's factors 4 times (5 for the layers whose step of the interval is the second) and begin 2 inverse
    # cycles; with the staggered capture every step captures a share of the layers
    shape = bench_step.Shape(hidden=16, layers=1, batch=4, image=8, patch=4)
    layers = len(FOP(bench_step.build_model(shape, torch.device("cpu"))).engine.layers)
    times = bench_step.measure(shape, ("kfac", "fop"), 4, 1, torch.device("cpu"), factor_interval=2)
    for kind in ("kfac", "fop"):
        _assert_factor_interval(times[kind]["layer_factor_updates"], layers, steps=8, factor_interval=2)
        assert (times[kind]["factor_updates"], times[kind]["inverse_updates"]) == (8, 2)


@pytest.mark.parametrize("stagger", [False, True], ids=["every_layer_together", "staggered"])
def test_runner_records_which_steps_captured(stagger):
    shape = bench_step.Shape(hidden=16, layers=1, batch=4, image=8, patch=4)
    model = bench_step.build_model(shape, torch.device("cpu"))
    opt = FOP(model, lr=1e-2, factor_interval=2, inverse_interval=2, stagger_capture=stagger)
    x, y = bench_step.make_batch(shape, torch.device("cpu"))
    runner = bench_step.Runner("fop", model, opt, bench_step.make_step("fop", model, opt, x, y))
    bench_step._timed_eigenbases(runner)
    for _ in range(4):
        runner.run_step(lambda: None, record=True)
    # with the stagger every step captures its share of the layers; else every second step captures all of them
    assert runner.captured == ([True] * 4 if stagger else [True, False, True, False])
    summary = bench_step._summary(runner, 2)
    plain = runner.passes_s if stagger else runner.passes_s[1::2]  # no step without capture: every step stands in
    assert summary["passes_plain_s"] == statistics.median(plain)
