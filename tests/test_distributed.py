"""Multi-process FOPTrainer with real gloo processes (torchrun / accelerate launch on CPU)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch

from hf_fop.distributed import group_sizes
from hf_fop.integrations.trainer import LOGGED_KEYS
from trainer_helpers import digits_dataset, single_thread_env, tiny_vit

HELPERS = str(Path(__file__).with_name("trainer_helpers.py"))
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: List[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def torchrun(nproc: int, out: Path, *worker_args: str) -> List[Dict]:
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
          HELPERS, "--out", str(out), *worker_args])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def single(out: Path, *worker_args: str) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, HELPERS, "--out", str(out), *worker_args])
    return torch.load(out / "rank0.pt", weights_only=False)


def _assert_replicas_identical(records: List[Dict]) -> None:
    first = records[0]
    for other in records[1:]:
        for k in first["params"]:
            assert torch.equal(first["params"][k], other["params"][k]), k
        for layer, entry in first["layers"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other["layers"][layer][key]), (layer, key)


def _losses(record: Dict) -> List[float]:
    return [h["loss"] for h in json.loads(record["log"]) if "loss" in h]


def test_group_sizes():
    assert group_sizes(2) == (1, 1)
    assert group_sizes(3) == (2, 1)
    assert group_sizes(4) == (2, 2)
    with pytest.raises(ValueError, match="world_size >= 2"):
        group_sizes(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Tuple[Path, List[Dict], Dict]:
    """The reference runs, launched once per module: 2 ranks x batch 8 (rank 0 gives g1, rank 1 gives g2) and 1
    process with gradient accumulation 2 x batch 8, which routes micro-batch 1 to g1 and micro-batch 2 to g2: the same
    two sub-batches (sequential sampling). 4 steps; both save ``checkpoint-2``."""
    root = tmp_path_factory.mktemp("pair")
    two = torchrun(2, root / "two", "--steps", "4", "--batch", "8", "--save_steps", "2")
    one = single(root / "one", "--steps", "4", "--batch", "8", "--accum", "2", "--save_steps", "2")
    return root, two, one


@pytest.mark.xdist_group("pair")
def test_two_processes_equal_one_process_fed_the_same_sub_batches(pair):
    _, two, one = pair
    assert two[0]["world_size"] == 2 and one["world_size"] == 1
    _assert_replicas_identical(two)
    for k in one["params"]:
        torch.testing.assert_close(two[0]["params"][k], one["params"][k], rtol=1e-4, atol=1e-5, msg=k)
    for layer, entry in one["layers"].items():
        torch.testing.assert_close(two[0]["layers"][layer]["A"], entry["A"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(two[0]["layers"][layer]["S"], entry["S"], rtol=1e-4, atol=1e-6)
    assert _losses(two[0]) == pytest.approx(_losses(one), rel=1e-4)
    assert two[0]["w1"] == 0.5
    assert two[0]["comm_hook"]  # FOPTrainer reduced g1/g2 inside DDP's backward
    logs = [[h for h in json.loads(r["log"]) if "loss" in h] for r in two]
    for step0, step1 in zip(*logs):  # each rank's own curvature seconds; max and mean over ranks, logged on both
        own = [step0["fop/curvature_seconds"], step1["fop/curvature_seconds"]]
        assert step0["fop/curvature_seconds_max"] == step1["fop/curvature_seconds_max"] == pytest.approx(max(own))
        assert step0["fop/curvature_seconds_mean"] == pytest.approx(sum(own) / 2)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory) -> List[Dict]:
    """2 ranks x 2 micro-batches of 4 for 3 steps, g1/g2 reduced by the DDP comm hook (the default); launched once."""
    return torchrun(2, tmp_path_factory.mktemp("accum"), "--steps", "3", "--batch", "4", "--accum", "2")


@pytest.mark.xdist_group("accumulated")
def test_two_processes_with_gradient_accumulation(accumulated, tmp_path):
    # 2 ranks x 2 micro-batches of 4: rank 0 takes batches 0 and 2 (g1), rank 1 batches 1 and 3 (g2). One process with
    # 4 micro-batches routes the first two to g1: the data is reordered 0, 2, 1, 3 so it gets the same sub-batches.
    two = accumulated
    one = single(tmp_path / "one", "--steps", "3", "--batch", "4", "--accum", "4", "--interleave")
    _assert_replicas_identical(two)
    for k in one["params"]:
        torch.testing.assert_close(two[0]["params"][k], one["params"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert _losses(two[0]) == pytest.approx(_losses(one), rel=1e-4)


@pytest.mark.xdist_group("accumulated")
def test_trainer_comm_hook_equals_post_backward_reduction_bitwise(accumulated, tmp_path):
    """FOPTrainer with the DDP comm hook (default) and with ``use_ddp_comm_hook = False``: the same bits."""
    hooked = accumulated
    plain = torchrun(2, tmp_path / "plain", "--steps", "3", "--batch", "4", "--accum", "2", "--no_comm_hook")
    assert hooked[0]["comm_hook"] and not plain[0]["comm_hook"]
    _assert_replicas_identical(hooked)
    _assert_replicas_identical([hooked[0], plain[0]])
    assert _losses(hooked[0]) == _losses(plain[0])


@pytest.mark.xdist_group("pair")
def test_two_process_resume_is_bitwise_identical(pair, tmp_path):
    root, full, _ = pair
    checkpoint = root / "two" / "checkpoint-2"
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["fop"]["global_step"] == 2
    resumed = torchrun(2, tmp_path / "resumed", "--steps", "4", "--batch", "8", "--resume", str(checkpoint))
    _assert_replicas_identical(resumed)
    for k in full[0]["params"]:
        assert torch.equal(full[0]["params"][k], resumed[0]["params"][k]), k
    for layer, entry in full[0]["layers"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed[0]["layers"][layer][key]), (layer, key)


@pytest.mark.xdist_group("pair")
def test_checkpoints_resume_across_world_sizes(pair, tmp_path):
    """A 2-process checkpoint resumes in 1 process (and back) and continues as the uninterrupted run (allclose).

    The checkpoint after step 2 falls between inverse steps (inverse_interval 2: global steps 0 and 2), when each rank
    holds only its local factor averages: FOPTrainer averages them before saving, so the file holds the global
    factors whatever the world size. 1 process with 2 micro-batches of 8 sees what 2 ranks with batch 8 see.
    The 1-process checkpoint resumes under curvature specialists (owner-only gradients, FOPTrainer's global-norm
    clipping).
    """
    root, two, one = pair
    one_from_two = single(tmp_path / "one_from_two", "--steps", "4", "--batch", "8", "--accum", "2",
                          "--resume", str(root / "two" / "checkpoint-2"))
    two_from_one = torchrun(2, tmp_path / "two_from_one", "--steps", "4", "--batch", "8", "--sharding", "specialists",
                            "--resume", str(root / "one" / "checkpoint-2"))
    _assert_replicas_identical(two_from_one)
    for resumed, full in ((one_from_two, two[0]), (two_from_one[0], one)):
        for k in full["params"]:
            torch.testing.assert_close(resumed["params"][k], full["params"][k], rtol=1e-4, atol=1e-5, msg=k)
        for layer, entry in full["layers"].items():
            for key in ("A", "S"):
                torch.testing.assert_close(resumed["layers"][layer][key], entry[key], rtol=1e-4, atol=1e-6)


def test_three_processes_weight_the_unequal_groups(tmp_path):
    # Ranks 0, 2 give g1 and rank 1 gives g2; w1 = 2/3 makes g_avg the mean over all three batches.
    three = torchrun(3, tmp_path / "three", "--steps", "2", "--batch", "8")
    assert three[0]["world_size"] == 3 and three[0]["w1"] == pytest.approx(2 / 3)
    _assert_replicas_identical(three)
    model, data = tiny_vit(), digits_dataset(24)  # sequential sampling: rank r took examples 8r..8r+7
    model(**data[:])["loss"].backward()
    expected = torch.stack([p.grad.norm() for p in model.parameters()]).norm().item()
    first = json.loads(three[0]["log"])[0]
    assert first["grad_norm"] == pytest.approx(expected, rel=1e-4)  # logged before clipping: |g_avg|


def test_accelerate_launch_two_cpu_processes_kfac(tmp_path):
    out = tmp_path / "acc"
    out.mkdir()
    _run(["accelerate", "launch", "--config_file", str(ROOT / "examples" / "accelerate_cpu_2proc.yaml"),
          "--main_process_port", str(_free_port()), HELPERS, "--out", str(out), "--steps", "2", "--optimizer", "kfac"])
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert records[0]["world_size"] == 2
    _assert_replicas_identical(records)  # DDP averaged the gradients; the factor reducer the curvature
    assert records[0]["bytes_reduced"] > 0


def test_fsdp_configuration_is_rejected(tmp_path):
    out = tmp_path / "fsdp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           HELPERS, "--out", str(out), "--steps", "1", "--fsdp"]
    proc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "FOPTrainer does not support FSDP yet" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def streamed_env_cpu(tmp_path_factory) -> List[Dict]:
    """2 ranks on a streamed dataset, 3 steps, launched once; the CPU flag comes from ``ACCELERATE_USE_CPU=1`` (not
    ``use_cpu=True``): the fix the no-CPU-flag error names."""
    out = tmp_path_factory.mktemp("stream")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           HELPERS, "--out", str(out), "--steps", "3", "--stream", "--no_cpu"]
    env = {**single_thread_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.xdist_group("streamed_env_cpu")
def test_two_processes_train_on_a_streamed_dataset(streamed_env_cpu):
    """load_dataset(..., streaming=True) under 2 processes: accelerate shards the stream, replicas stay identical."""
    records = streamed_env_cpu
    _assert_replicas_identical(records)
    assert all(r["world_size"] == 2 and r["w1"] == 0.5 for r in records)
    log = json.loads(records[0]["log"])
    steps = [h for h in log if "loss" in h]
    assert len(steps) == 3 and all("fop/beta" in h and h["fop/fallback_fraction"] == 0.0 for h in steps)
    assert all(h["fop/beta"] != 0.0 for h in steps)  # g1 != g2: the two ranks got different batches
    assert all(torch.isfinite(v).all() for v in records[0]["params"].values())


def test_two_processes_with_a_per_call_mean_loss_log_and_step_on_the_mean(tmp_path):
    """BERT's classification loss ignores num_items_in_batch although its forward takes **kwargs, so transformers
    5.24's compute_loss multiplies the per-call mean by num_processes (2x loss and gradient): FOPTrainer must not.
    Step 1 captures no curvature: the glue reads from the device at most once there (logging excluded)."""
    common = ("--model", "bert", "--steps", "2", "--batch", "8", "--examples", "64", "--factor_interval", "2", "--count_syncs")
    two = torchrun(2, tmp_path / "two", *common)
    one = single(tmp_path / "one", *common, "--accum", "2")
    _assert_replicas_identical(two)
    assert _losses(two[0]) == pytest.approx(_losses(one), rel=1e-4)
    assert all(len(r["syncs"].get(1, [])) <= 1 for r in two + [one]), [r["syncs"] for r in two + [one]]
    assert any("distributed/collectives.py" in s for s in two[0]["syncs"][0])  # the counter sees the factor exchange's read
    logged = {k for entry in json.loads(two[0]["log"]) for k in entry if k.startswith("fop/")}
    assert {"fop/curvature_seconds_max", "fop/curvature_seconds_mean"} <= logged <= set(LOGGED_KEYS)  # all documented
    for k in one["params"]:
        torch.testing.assert_close(two[0]["params"][k], one["params"][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.xdist_group("streamed_env_cpu")
def test_two_processes_without_the_cpu_flag_stop_with_the_fix(tmp_path, streamed_env_cpu):
    """torchrun on CPU with use_cpu=False: a process group the Trainer does not use (two unsharded copies)."""
    out = tmp_path / "nocpu"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           HELPERS, "--out", str(out), "--steps", "1", "--no_cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "every process would train its own unsharded copy" in text
    assert "use_cpu=True" in text and "--use_cpu" in text and "ACCELERATE_USE_CPU=1" in text
    assert not list(out.glob("rank*.pt"))
    # the environment variable the message names is a working fix: the same script (use_cpu=False) with
    # ACCELERATE_USE_CPU=1 trained as a real 2-process run (the streamed run's launch)
    assert all(r["world_size"] == 2 for r in streamed_env_cpu)
    _assert_replicas_identical(streamed_env_cpu)


# ------------------------------------------------ plain-PyTorch FOP on real gloo processes (tests/dist_workers.py)
WORKERS = str(Path(__file__).with_name("dist_workers.py"))


def plain_torchrun(nproc: int, out: Path, *worker_args: str) -> List[Dict]:
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}",
          WORKERS, "--out", str(out), *worker_args])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def _assert_plain_replicas_identical(records: List[Dict]) -> None:
    for other in records[1:]:
        for k, v in records[0]["params"].items():
            assert torch.equal(v, other["params"][k]), k
        for layer, entry in records[0]["layers"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, other["layers"][layer][key]), (layer, key)


def _assert_matches_single(records: List[Dict], single_record: Dict) -> None:
    for k, v in single_record["params"].items():
        torch.testing.assert_close(records[0]["params"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    for layer, entry in single_record["layers"].items():
        for key in ("A", "S", "eig_a", "eig_s"):
            if key in entry:
                torch.testing.assert_close(records[0]["layers"][layer][key], entry[key], rtol=1e-4, atol=1e-6,
                                           msg=f"{layer} {key}")
            else:
                assert key not in records[0]["layers"][layer]


@pytest.mark.parametrize(
    "nproc,mode,accum,scenario",
    [(2, "fop", 1, "plain"), (3, "fop", 2, "unused"), (3, "kfac", 2, "plain")],
)
def test_factors_meet_only_on_inverse_steps_and_match_one_process(tmp_path, nproc, mode, accum, scenario):
    """Local factor running averages, averaged over ranks only before eigendecompositions, equal the per-step average.

    6 steps, inverse_interval 3: steps 0 and 3 eigendecompose; between them the ranks' factors differ (pending) and
    only the gradients and an (L + 1)-float flag cross the wire. Parameters, factors and eigenvalues match one process
    fed the same sub-batches (allclose: the sums run in another order); replicas stay bitwise identical.
    """
    from dist_workers import single_process

    steps, inverse_interval = 6, 3
    records = plain_torchrun(nproc, tmp_path / "run", "--mode", mode, "--steps", str(steps), "--accum", str(accum),
                             "--inverse_interval", str(inverse_interval), "--scenario", scenario)
    _assert_plain_replicas_identical(records)
    _assert_matches_single(records, single_process(nproc, mode, steps, accum, inverse_interval, scenario))
    assert records[0]["counters"]["inverse_updates"] == 2 and records[0]["counters"]["factor_updates"] == steps
    assert records[0]["pending"] == [step % inverse_interval != 0 for step in range(steps)]
    sent = records[0]["bytes_per_step"]
    flags = 4 * (3 + 1)  # one count per managed layer (fc1, extra, fc2) and the finiteness flag
    n_params = sum(v.numel() for v in records[0]["params"].values())
    grads = 4 * (n_params + 7) if mode == "fop" else 0  # all_gather of local gradients + 7 presence flags; K-FAC: DDP
    dims = {"fc1": (7, 8), "fc2": (8, 4), "extra": (9, 8)}
    names = ["fc1", "extra", "fc2"] if scenario == "unused" else ["fc1", "fc2"]  # layers holding factors
    triu = 4 * sum(d * (d + 1) // 2 for n in names for d in dims[n])
    assert sent == [grads + flags + (triu if step % inverse_interval == 0 else 0) for step in range(steps)]


@pytest.mark.parametrize("mode", ["fop", "kfac"])
def test_staggered_refresh_averages_only_the_due_layers_and_matches_one_process(tmp_path, mode):
    """The default staggered refresh under 2 processes: each step averages (all_reduce) and decomposes only the layers
    whose slot it is (step 0: every layer, their first factors), and the run equals one process fed the same
    sub-batches with the same schedule."""
    from dist_workers import single_process

    from hf_fop.refresh import refresh_slots

    steps, inverse_interval = 6, 3
    records = plain_torchrun(2, tmp_path / "run", "--mode", mode, "--steps", str(steps), "--inverse_interval",
                             str(inverse_interval), "--stagger")
    _assert_plain_replicas_identical(records)
    _assert_matches_single(records, single_process(2, mode, steps, 1, inverse_interval, "plain", stagger_refresh=True))
    managed = {"fc1": (7, 8), "extra": (9, 8), "fc2": (8, 4)}  # (A side with the bias column, S side), in model order
    slots = dict(zip(managed, refresh_slots([i**3 + o**3 for i, o in managed.values()], inverse_interval)))
    assert sorted(slots.values()) == [0, 1, 2]  # one layer per step of the cycle (``extra``, unused, never has factors)
    dims = {n: managed[n] for n in ("fc1", "fc2")}  # the layers holding factors
    triu = {n: 4 * sum(d * (d + 1) // 2 for d in dims[n]) for n in dims}
    n_params = sum(v.numel() for v in records[0]["params"].values())
    base = (4 * (n_params + 7) if mode == "fop" else 0) + 4 * (3 + 1)  # gradients + capture counts and flag
    due = [list(dims) if step == 0 else [n for n in dims if slots[n] == step % inverse_interval] for step in range(steps)]
    assert records[0]["bytes_per_step"] == [base + sum(triu[n] for n in names) for names in due]


def test_a_rank_with_nonfinite_factors_makes_every_rank_skip(tmp_path):
    """Step 1: only the last rank's A overflows (its gradients stay finite); the one-element flag skips it everywhere."""
    records = plain_torchrun(2, tmp_path / "run", "--steps", "3", "--scenario", "nonfinite")
    _assert_plain_replicas_identical(records)
    assert [r["counters"]["skipped_steps"] for r in records] == [1, 1]
    assert all(r["counters"]["factor_updates"] == 2 for r in records)
    assert all(torch.isfinite(v).all() for v in records[0]["params"].values())


@pytest.mark.parametrize("nproc,accum,scenario", [(2, 2, "plain"), (3, 1, "unused")])
def test_comm_hook_equals_post_backward_reduction_bitwise(tmp_path, nproc, accum, scenario):
    """g1/g2 reduced per DDP bucket inside the backward pass give the post-backward path's bits.

    Each rank trains two copies on the same batches: one through ``reduce_gradients`` (every micro-batch local), one
    DDP-wrapped with the comm hook (``no_sync`` on all micro-batches but the last). The worker asserts ``p.grad``
    (g_avg) bitwise equal every step, including ``None`` for the never-used layer (``plain``) and gradients only some
    ranks produce (``unused``); here parameters and factors after 4 steps are compared bitwise.
    """
    records = plain_torchrun(nproc, tmp_path / "run", "--steps", "4", "--accum", str(accum), "--scenario", scenario,
                             "--compare_hook")
    for rec in records:
        for k, v in rec["params"].items():
            assert torch.equal(v, rec["hook"]["params"][k]), k
        for layer, entry in rec["layers"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, rec["hook"]["layers"][layer][key]), (layer, key)
        assert rec["hook"]["counters"] == rec["counters"]
        timeless = [{k: v for k, v in d.items() if k != "curvature_seconds"} for d in (rec["hook"]["diagnostics"], rec["diagnostics"])]
        assert timeless[0] == timeless[1] and "beta_mean" in timeless[0]  # beta*, s_proj flip sign with g1 - g2
    _assert_plain_replicas_identical([r["hook"] for r in records])


# ------------------------------------------------------- curvature specialists (hf_fop/specialists.py, real processes)
def test_specialist_assignment_is_deterministic_and_balanced():
    """Greedy cost balance over tiny-ViT (14 managed layers) and ViT-B/16 (74) shapes, built on the meta device."""
    from transformers import ViTConfig, ViTForImageClassification

    from hf_fop import FOPConfig
    from hf_fop.curvature import find_layers
    from hf_fop.distributed.specialists import assign_owners, layer_cost, owner_loads

    assert layer_cost(7, 8) == 7**3 + 8**3 + 56 * 15
    assert assign_owners([(7, 8), (9, 8), (8, 4)], 2) == [1, 0, 1]  # costliest (9, 8) first, to rank 0
    assert assign_owners([(4, 4), (4, 4), (4, 4)], 3) == [0, 1, 2]  # ties: lower index, lower rank
    tiny = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, num_labels=10)
    ratios = {}
    for name, config in (("tiny", tiny), ("B16", ViTConfig())):
        with torch.device("meta"):
            layers, _ = find_layers(ViTForImageClassification(config), FOPConfig())
        shapes = [(layer.in_dim, layer.out_dim) for layer in layers]
        for world_size in (2, 3, 8):
            owners = assign_owners(shapes, world_size)
            assert owners == assign_owners(list(shapes), world_size)  # deterministic
            assert set(owners) == set(range(world_size))
            loads = owner_loads(shapes, owners, world_size)
            ratios[name, world_size] = max(loads) / min(loads)
    # max/min cost per rank: tiny 1.0003 / 1.038 / 1.86 (14 layers on 8 ranks), ViT-B/16 1.003 / 1.005 / 1.014
    assert all(r < 1.05 for (name, w), r in ratios.items() if w < 8 or name == "B16"), ratios
    assert ratios["tiny", 8] < 2.0, ratios


def _assert_run_matches(records: List[Dict], name: str, single_record: Dict) -> None:
    runs = [r[name] for r in records]
    _assert_plain_replicas_identical(runs)
    own = ("curvature_seconds", "block_rotations", "block_rotations_skipped")  # each process's own work
    timeless = [{k: v for k, v in r["diagnostics"].items() if k not in own} for r in runs]
    assert all(t == timeless[0] for t in timeless), name  # every rank logs the same stats
    _assert_matches_single(runs, single_record)
    assert runs[0]["counters"] == single_record["counters"], name
    assert not runs[0]["pending"]


def test_specialists_two_processes_match_one_process_resume_across_modes_and_survive_an_eigh_failure(tmp_path):
    """One launch, 2 processes, FOP with accumulation 2, 6 steps, eigendecompositions at steps 0 and 3:

    ``spec`` specialists from scratch (checkpoint before step 4, between inverse steps); ``rep`` replicated resumed
    from it (checkpoint before step 5); ``spec2`` specialists resumed from that. Each equals one process fed the same
    sub-batches (allclose) with bitwise identical replicas; one process resumed from ``spec``'s checkpoint too. The
    checkpoint holds the full state of one process. A NaN gradient on one rank in a layer the other owns skips the
    step everywhere. Staggered and block refresh (``max_eigh_dim`` 4; owners' and replicated; by sweeps and by rounds)
    and staggered capture equal one process too; adaptive block refresh by owners equals it replicated.
    Then a forced eigendecomposition failure on one owner, and the ranks' agreement on bfloat16 rotations.
    """
    from dist_workers import single_process

    from hf_fop.distributed.specialists import assign_owners

    out = tmp_path / "run"
    records = plain_torchrun(2, out, "--steps", "6", "--accum", "2", "--inverse_interval", "3", "--eigh_failure", "--bfloat16_answer",
                             "--job", "spec,fop,specialists,plain,-,4", "--job", "rep,fop,replicated,plain,{out}/spec_4.pt,5",
                             "--job", "spec2,fop,specialists,plain,{out}/rep_5.pt,-", "--job", "nangrad,fop,specialists,nangrad,-,-",
                             "--job", "nangradoff,fop,specialists,nangrad,-,-,factor_interval=3",
                             "--job", "stagger,fop,specialists,plain,-,-,stagger_refresh=true",
                             "--job", "blocks,fop,specialists,plain,-,-,stagger_refresh=true;max_eigh_dim=4;block_refresh=sweep",
                             "--job", "blocksrep,fop,replicated,plain,-,-,stagger_refresh=true;max_eigh_dim=4;block_refresh=sweep",
                             "--job", "rounds,fop,specialists,plain,-,-,stagger_refresh=true;max_eigh_dim=4;block_refresh=round",
                             "--job", "adaptive,fop,specialists,plain,-,-,stagger_refresh=true;max_eigh_dim=4;"
                             "block_refresh=adaptive;block_tolerance=0.075",
                             "--job", "adaptiverep,fop,replicated,plain,-,-,stagger_refresh=true;max_eigh_dim=4;"
                             "block_refresh=adaptive;block_tolerance=0.075",
                             "--job", "stagcap,fop,specialists,plain,-,-,stagger_refresh=true;stagger_capture=true;factor_interval=3")
    one = single_process(2, "fop", 6, 2, 3, "plain", save=str(tmp_path / "one_4.pt"), save_at=4)
    for name in ("spec", "rep", "spec2"):
        _assert_run_matches(records, name, one)
    # the default staggered refresh: owners decompose their layers on the layers' slot steps, as one process does
    _assert_run_matches(records, "stagger", single_process(2, "fop", 6, 2, 3, "plain", stagger_refresh=True))
    # block refresh (max_eigh_dim 4: the factors of 7, 8 and 9 in 4 groups), owners' and replicated, as one process
    blocks = single_process(2, "fop", 6, 2, 3, "plain", stagger_refresh=True, max_eigh_dim=4, block_refresh="sweep")
    _assert_run_matches(records, "blocks", blocks)
    _assert_run_matches(records, "blocksrep", blocks)
    # block refresh by rounds (3 rounds of 2 pairs; cycles 0 and 1 of 3 steps): owners as one process
    rounds = single_process(2, "fop", 6, 2, 3, "plain", stagger_refresh=True, max_eigh_dim=4, block_refresh="round")
    _assert_run_matches(records, "rounds", rounds)
    assert any(not torch.equal(rounds["params"][k], blocks["params"][k]) for k in blocks["params"])  # not a sweep
    # adaptive block refresh: the owners' probes decide as every rank's do in replicated mode (the same global factors);
    # between rounds and sweeps. Against one process the decisions are thresholds on numbers that differ in rounding,
    # and these factors of rank-deficient batches, with pairs of 4 columns probed 8 times, put some near any threshold
    runs = {name: [r[name] for r in records] for name in ("adaptive", "adaptiverep")}
    for name in runs:
        _assert_plain_replicas_identical(runs[name])
    _assert_matches_single(runs["adaptive"], runs["adaptiverep"][0])
    rotations = {name: [r["diagnostics"]["block_rotations"] for r in runs[name]] for name in runs}
    assert rotations["adaptiverep"][0] == rotations["adaptiverep"][1] == sum(rotations["adaptive"]), rotations
    assert min(rotations["adaptive"]) == 0  # one owner holds the factors over max_eigh_dim and does their rotations
    assert rounds["diagnostics"]["block_rotations"] < sum(rotations["adaptive"]) < blocks["diagnostics"]["block_rotations"]
    # staggered capture (factors every 3 steps, each of the 3 layers on its own step): owners as one process
    stagcap = single_process(2, "fop", 6, 2, 3, "plain", stagger_refresh=True, stagger_capture=True, factor_interval=3)
    # steps 0-5: every layer on step 0, then fc1 and fc2 on their own steps of each 3 (layer extra, unused in this
    # scenario, holds the slot of step 3, which captures nothing): 5 steps update factors (2 without the stagger)
    assert stagcap["counters"]["factor_updates"] == 5
    _assert_run_matches(records, "stagcap", stagcap)
    resumed = single_process(2, "fop", 6, 2, 3, "plain", resume=str(out / "spec_4.pt"))
    _assert_matches_single([resumed], one)
    saved = torch.load(out / "spec_4.pt", weights_only=False)["optimizer"]["fop"]["layers"]
    reference = torch.load(tmp_path / "one_4.pt", weights_only=False)["optimizer"]["fop"]["layers"]
    for layer, entry in reference.items():
        assert set(saved[layer]) == set(entry), layer  # every factor and basis, as one process saves them
        for key in ("A", "S", "eig_a", "eig_s"):
            if key in entry:
                torch.testing.assert_close(saved[layer][key], entry[key], rtol=1e-4, atol=1e-6)
    spec = records[0]["spec"]
    assert spec["owners"] == dict(zip(["fc1", "extra", "fc2"], assign_owners([(7, 8), (9, 8), (8, 4)], 2)))
    # bytes per step: gradients to the owners (7 presence flags, the LayerNorm's 16 to everybody, a (2, 88) buffer of
    # fc1's and fc2's 56 + 32 to their owner, rank 1) + capture counts (3 layers + the finiteness flag: every step
    # captures, so the vote rides with the counts) + stats table (2 layers with gradients x 9 float32) + directions
    # (fc1 8x7 + fc2 4x8, both from rank 1); inverse steps add the owner reduce of the factor triangles (fc1 28 + 36,
    # fc2 36 + 10) and the failure flag
    base = 4 * (7 + 16 + 2 * 88) + 4 * 4 + 2 * 9 * 4 + 4 * (56 + 32)
    assert spec["bytes_per_step"] == [base + (4 * 110 + 4 if step % 3 == 0 else 0) for step in range(6)]
    # a NaN gradient of fc2 on rank 0 reaches only fc2's owner (rank 1): the global flag makes both skip the step,
    # whether it rides with the capture counts (a capture step) or goes alone (factor interval 3: step 1 captures nothing)
    for job in ("nangrad", "nangradoff"):
        _assert_plain_replicas_identical([r[job] for r in records])
        assert [r[job]["counters"]["skipped_steps"] for r in records] == [1, 1], job
        assert all(torch.isfinite(v).all() for v in records[0][job]["params"].values()), job
    failure = [r["eigh_failure"] for r in records]
    owner = failure[0]["owner"]
    assert all(f["step"] == 2 and f["error"] and f["seconds"] < 30 for f in failure), failure  # same step, no hang
    assert "factor A of layer 'fc1' failed 2 times" in failure[owner]["error"]  # the one-process error
    assert failure[owner]["float64_calls"] == 2 and failure[owner]["kept_basis"]  # float64 retry, last basis kept
    assert failure[owner]["failures_after_1"] == {"A": 1, "S": 0}
    assert any("keeping the last good basis" in w for w in failure[owner]["warnings"])
    assert f"on its owner rank {owner}" in failure[1 - owner]["error"] and "'fc1'" in failure[1 - owner]["error"]
    # whether bfloat16 is faster is timed per process; replicated curvature needs one answer: rank 0's
    answers = [r["bfloat16_answer"] for r in records]
    assert [a["before"] for a in answers] == [False, True]
    assert [(a["after"], a["dtype"]) for a in answers] == [(False, "torch.float32")] * 2


def test_specialists_three_processes_fop_kfac_and_resume_from_one_process(tmp_path):
    """One launch, 3 processes, accumulation 2: FOP with a layer only the even ranks use (each rank owns one layer)
    and no trust region, K-FAC (DDP averages the gradients) with relative damping, and FOP resumed from a
    one-process checkpoint taken before step 3."""
    from dist_workers import single_process

    fop = single_process(3, "fop", 6, 2, 3, "unused", save=str(tmp_path / "one_3.pt"), save_at=3)
    fop_plain = single_process(3, "fop", 6, 2, 3, "unused", kl_clip=None)
    kfac = single_process(3, "kfac", 6, 2, 3, "plain", damping_mode="relative")
    records = plain_torchrun(3, tmp_path / "run", "--steps", "6", "--accum", "2", "--inverse_interval", "3",
                             "--job", "fop,fop,specialists,unused,-,-,kl_clip=none",
                             "--job", "kfac,kfac,specialists,plain,-,-,damping_mode=relative",
                             "--job", f"resumed,fop,specialists,unused,{tmp_path / 'one_3.pt'},-")
    assert sorted(records[0]["fop"]["owners"].values()) == [0, 1, 2]
    assert "kl_clip_scale" not in records[0]["fop"]["diagnostics"]
    for name, reference in (("fop", fop_plain), ("kfac", kfac), ("resumed", fop)):
        _assert_run_matches(records, name, reference)
