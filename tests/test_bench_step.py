"""scripts/bench_step.py and scripts/profile_step.py run end to end on a tiny ViT and report sane figures.

Not a timing test: it checks the JSON contract (keys, ratios consistent with
the reported times, no skipped steps, state bytes that match the model) and
the argument errors.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    assert set(result["goals"]) == {"fop_over_adamw", "fop_over_kfac", "peak_fop_over_adamw"}
    assert {(p["batch"], p["interval"]) for p in result["sweep"]["batch"]} == {(b, k) for b in (4, 8) for k in (2,)}
    assert {(p["hidden"], p["interval"]) for p in result["sweep"]["hidden"]} == {(h, k) for h in (16, 32) for k in (2,)}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert result["factor_interval"] == 2 and result["factor_updates"] == 2  # warm-up and profiled cycle: 2 captures


def test_profile_takes_the_shipped_schedule_and_rejects_a_factor_interval_that_does_not_divide():
    done = _run("profile_step.py", "--hidden", "32", "--layers", "1", "--batch", "8", "--interval", "4",
                "--factor-interval", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["interval"], result["factor_interval"]) == (4, 2)
    assert result["factor_updates"] == 4  # 8 steps (warm-up and profiled cycle), factors every 2
    done = _run("profile_step.py", "--interval", "4", "--factor-interval", "3")
    assert done.returncode == 2 and "--factor-interval must be a divisor of --interval (4)" in done.stderr


@pytest.mark.parametrize(
    "args,message",
    [(["--batch", "7"], "--batch must be even"), (["--plot", "x.png"], "--plot needs --sweep"),
     (["--interval", "0"], "--interval must be an integer >= 1"),
     (["--interval", "20", "--factor-interval", "3"], "--factor-interval (3) must divide --interval (20)")],
)  # fmt: skip
def test_bad_arguments_name_the_option(args, message, capsys):
    with pytest.raises(SystemExit):
        bench_step.parse_args(args)
    assert message in capsys.readouterr().err


def test_factor_interval_sets_the_capture_schedule_alone():
    # eigenbases every 4 steps, factors every 2: over the warm-up and one timed cycle (8 steps) FOP and K-FAC update
    # their factors 4 times and begin 2 inverse cycles
    shape = bench_step.Shape(hidden=16, layers=1, batch=4, image=8, patch=4)
    times = bench_step.measure(shape, ("kfac", "fop"), 4, 1, torch.device("cpu"), factor_interval=2)
    for kind in ("kfac", "fop"):
        assert (times[kind]["factor_updates"], times[kind]["inverse_updates"]) == (4, 2)
