"""FOP in a plain Accelerate loop (hf_fop.integrations.accelerate): same parameters as FOPTrainer and as explicit sub-batches."""

from __future__ import annotations

import contextlib
import functools
import io
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader

from accelerate_helpers import CONFIG, MAX_GRAD_NORM, accelerate_loop
from script_loader import load_script
from hf_fop import FOP, FOPConfig, FOPTrainer
from hf_fop.integrations.accelerate import attach_accelerate, router_of, sub_batches
from hf_fop.integrations.routing import Piece, piece_inputs
from test_distributed import _free_port, _run
from trainer_helpers import cls_text_dataset, digits_dataset, make_args, single_thread_env, tiny_bert, tiny_vit

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).with_name("accelerate_helpers.py"))
EXAMPLE = ROOT / "examples" / "run_image_classification_no_trainer.py"
BATCH = 8
STEPS = 3


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: every test starts (and leaves) them empty."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _config(mode: str) -> FOPConfig:
    return FOPConfig(mode=mode, **CONFIG)


def _plain_loop(
    mode: str, accum: int, steps: int = STEPS, clip: bool = False, config: Optional[FOPConfig] = None,
    seed: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """The oracle: explicit ``sub_batch(0)`` / ``sub_batch(1)`` (FOP) or plain backward (K-FAC), same batches.

    ``seed``: reseed, then start a DataLoader iterator (it draws one number, as the Accelerate loop's loader does).
    """
    data = digits_dataset(96)
    model = tiny_vit()
    opt = FOP(model, config or _config(mode))
    if seed is not None:
        torch.manual_seed(seed)
        iter(DataLoader(data, batch_size=BATCH))

    def backward(mb: Dict[str, torch.Tensor], scale: float) -> None:
        out = model(**mb)
        if opt.config.fisher_type == "mc":  # the sampled loss weighted as the real one: S of the sub-batch's mean loss
            opt.mc_backward(out.logits, weight=scale)
        (out.loss * scale).backward()

    micro = [data[i * BATCH : (i + 1) * BATCH] for i in range(steps * accum)]
    for s in range(steps):
        window = micro[s * accum : (s + 1) * accum]
        if mode == "kfac":
            for mb in window:
                backward(mb, 1 / accum)
        else:
            if accum == 1:
                halves = [[piece_inputs(window[0], Piece(0, j, rows))] for j, rows in enumerate(((0, BATCH // 2), (BATCH // 2, BATCH)))]
            else:
                first = (accum + 1) // 2
                halves = [window[:first], window[first:]]
            w1 = len(halves[0]) / (len(halves[0]) + len(halves[1]))
            for j, group in enumerate(halves):
                with opt.sub_batch(j, w1):
                    for mb in group:
                        backward(mb, 1 / len(group))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trainer(
    tmp_path: Path, mode: str, accum: int, model_fn: Callable[[], torch.nn.Module] = tiny_vit, data: Any = None
) -> Dict[str, Any]:
    args = make_args(
        tmp_path / f"trainer-{mode}-{accum}", per_device_train_batch_size=BATCH, gradient_accumulation_steps=accum,
        max_steps=STEPS, train_sampling_strategy="sequential", fop_optimizer=mode, learning_rate=CONFIG["lr"],
        fop_damping=CONFIG["damping"], fop_inverse_interval=CONFIG["inverse_interval"], fop_momentum=CONFIG["momentum"],
        max_grad_norm=0.0,
    )
    trainer = FOPTrainer(model=model_fn(), args=args, train_dataset=digits_dataset(96) if data is None else data)
    trainer.train()
    assert trainer.fop_optimizer.config == _config(mode)
    return {
        "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "layers": trainer.fop_optimizer.state_dict()["fop"]["layers"],
    }


def _assert_factors_close(a: Dict[str, Any], b: Dict[str, Any], rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """Curvature factors A and S of every managed layer (the padding mask and the S scaling act here)."""
    assert a.keys() == b.keys()
    for name in a:
        for key in ("A", "S"):
            torch.testing.assert_close(a[name][key], b[name][key], rtol=rtol, atol=atol, msg=f"{name} {key}")


def _assert_params_close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _assert_params_differ(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4


# ------------------------------------------------------------------ one process
@pytest.mark.parametrize("mode,accum", [("fop", 2), ("fop", 1), ("fop", 3), ("kfac", 2), ("kfac", 1)])
def test_loop_equals_plain_sub_batches_and_trainer(tmp_path, mode, accum):
    """One routing plan (hf_fop.integrations.routing) for both front ends: the same parameters and factors, odd windows included."""
    loop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=accum), _config(mode), BATCH, STEPS)
    assert loop["global_step"] == STEPS
    assert loop["counters"]["fallback_steps"] == 0
    if mode == "fop":
        assert loop["w1"] == pytest.approx(2 / 3 if accum == 3 else 0.5)  # odd n: g1 gets the extra micro-batch
    # odd n: loss / 3 then x 3/2 is not exact in float32 (powers of two are); AdamW magnifies that on tiny gradients
    atol = 1e-5 if accum == 3 else 1e-6
    plain = _plain_loop(mode, accum)
    _assert_params_close(loop["params"], plain, atol=atol)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = _trainer(tmp_path, mode, accum)
    _assert_params_close(loop["params"], trainer["params"], atol=atol)
    _assert_factors_close(loop["layers"], trainer["layers"], *((1e-4, 1e-6) if accum == 3 else ()))
    _assert_params_differ(loop["params"], {k: v for k, v in tiny_vit().state_dict().items()})


@pytest.mark.parametrize("examples,steps,fallbacks", [(28, 1, 0), (40, 2, 1)], ids=["unequal", "short-last-window"])
def test_unequal_and_short_windows_are_routed_as_in_the_trainer(tmp_path, examples, steps, fallbacks):
    """Windows of 4 micro-batches of 8 examples. 28 examples: 8, 8, 8 and 4, so g2 = (8 g_c + 4 g_d) / 12 and
    w1 = 16/28 (the Accelerate loop rescales p.grad between g2's unequal pieces; FOPTrainer scales their losses).
    40 examples, 2 steps: the epoch's last window has one micro-batch, no second half: a K-FAC step in both."""
    data = digits_dataset(examples)
    loop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=4), _config("fop"), BATCH, steps, data=data)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = make_args(
        tmp_path, per_device_train_batch_size=BATCH, gradient_accumulation_steps=4, max_steps=steps,
        train_sampling_strategy="sequential", learning_rate=CONFIG["lr"], fop_damping=CONFIG["damping"],
        fop_inverse_interval=CONFIG["inverse_interval"], fop_momentum=CONFIG["momentum"], max_grad_norm=0.0,
    )
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=data)
    trainer.train()
    opt = trainer.fop_optimizer
    assert loop["global_step"] == opt.global_step == steps
    assert loop["counters"]["fallback_steps"] == opt.counters["fallback_steps"] == fallbacks
    if not fallbacks:
        assert loop["w1"] == pytest.approx(16 / 28) and opt.w1 == pytest.approx(16 / 28)
    _assert_params_close(loop["params"], {k: v.detach() for k, v in trainer.model.state_dict().items()})
    _assert_factors_close(loop["layers"], opt.state_dict()["fop"]["layers"])


@pytest.mark.parametrize("accum", [2, 1])
def test_clipping_acts_on_g_avg(accum):
    """When the window's last backward ends p.grad holds g_avg: accelerator.clip_grad_norm_ clips the mean gradient."""
    loop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=accum), _config("fop"), BATCH, STEPS, clip=True)
    clipped = _plain_loop("fop", accum, clip=True)
    _assert_params_close(loop["params"], clipped)
    _assert_params_differ(clipped, _plain_loop("fop", accum))  # the clipping was active


@pytest.mark.parametrize("accum", [2, 1, 4])
def test_mc_fisher_samples_labels_after_each_forward(accum):
    """fisher_type='mc': the router runs opt.mc_backward(logits) where the plain loop calls it (same RNG draws)."""
    config = _config("fop").replace(fisher_type="mc")
    loop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=accum), config, BATCH, STEPS, seed=1)
    plain = _plain_loop("fop", accum, config=config, seed=1)
    _assert_params_close(loop["params"], plain)
    _assert_params_differ(plain, _plain_loop("fop", accum))  # the sampled Fisher is not the empirical one


def test_mc_fisher_of_two_micro_batches_per_sub_batch_equals_the_trainers(tmp_path):
    """fisher_type='mc', windows of 4: both front ends weight each piece's sampled loss as its real loss (S of the
    sub-batch's mean loss, not 4 x it), drawing the same labels from the same seed."""
    config = _config("fop").replace(fisher_type="mc")
    loop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=4), config, BATCH, 2, seed=0)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = make_args(
        tmp_path, per_device_train_batch_size=BATCH, gradient_accumulation_steps=4, max_steps=2, seed=0,
        train_sampling_strategy="sequential", learning_rate=CONFIG["lr"], fop_damping=CONFIG["damping"],
        fop_inverse_interval=CONFIG["inverse_interval"], fop_momentum=CONFIG["momentum"], max_grad_norm=0.0,
        fop_fisher_type="mc",
    )
    trainer = FOPTrainer(model=tiny_vit(), args=args, train_dataset=digits_dataset(96))
    trainer.train()
    _assert_factors_close(loop["layers"], trainer.fop_optimizer.state_dict()["fop"]["layers"])
    _assert_params_close(loop["params"], {k: v.detach() for k, v in trainer.model.state_dict().items()})


@pytest.mark.parametrize("accum", [2, 1])
def test_padded_text_batches_equal_the_trainer(tmp_path, accum):
    """BERT on padded batches: the model call's attention_mask keeps padding out of the curvature, as in FOPTrainer."""
    model_fn = functools.partial(tiny_bert, dropout=0.0)
    data = cls_text_dataset(64)
    loop = accelerate_loop(
        Accelerator(cpu=True, gradient_accumulation_steps=accum), _config("fop"), BATCH, STEPS, data=data, model_fn=model_fn
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    trainer = _trainer(tmp_path, "fop", accum, model_fn=model_fn, data=data)
    _assert_params_close(loop["params"], trainer["params"])
    _assert_factors_close(loop["layers"], trainer["layers"])


def test_fop_loop_differs_from_kfac_loop():
    """The routing matters: FOP on two sub-batches is not K-FAC on their union (the tests above can tell them apart)."""
    fop = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, STEPS)
    _assert_params_differ(fop["params"], _plain_loop("kfac", 2))


def test_one_batch_per_step_without_sub_batches_is_rejected():
    accelerator = Accelerator(cpu=True)
    model = tiny_vit()
    opt = FOP(model, _config("fop"))
    attach_accelerate(opt, model, accelerator)
    model, opt = accelerator.prepare(model, opt)
    batch = digits_dataset(8)[:]
    with pytest.raises(RuntimeError, match="sub_batches"):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)


def test_accelerator_argument_must_be_an_accelerator():
    with pytest.raises(TypeError, match="accelerate.Accelerator"):
        model = tiny_vit()
        attach_accelerate(FOP(model, _config("fop")), model, object())


def test_release_removes_the_routers_model_and_step_hooks():
    """FOP.release() leaves the model as it was: no forward (pre-)hook of the router, no step hook on the optimizer."""
    model = tiny_vit()
    opt = FOP(model, _config("fop"))
    attach_accelerate(opt, model, Accelerator(cpu=True))
    assert model._forward_pre_hooks and model._forward_hooks and opt._optimizer_step_pre_hooks
    opt.release()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_sub_batches_leaves_the_batch_whole_when_not_needed():
    """Window routing (accumulation 2), K-FAC, a non-FOP optimizer: the batch itself (no-op for the user)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    batch = digits_dataset(8)[:]
    kfac_model, window_model = tiny_vit(), tiny_vit()
    kfac = FOP(kfac_model, _config("kfac"))
    attach_accelerate(kfac, kfac_model, accelerator)
    window = FOP(window_model, _config("fop"))
    attach_accelerate(window, window_model, accelerator)
    adamw = torch.optim.AdamW(tiny_vit().parameters())
    for opt in (kfac, window, adamw, accelerator.prepare(window)):
        pieces = list(sub_batches(opt, batch))
        assert len(pieces) == 1 and pieces[0] is batch


def test_batch_of_one_falls_back_to_kfac_with_a_warning():
    accelerator = Accelerator(cpu=True)
    model = tiny_vit()
    opt = FOP(model, _config("fop"))
    attach_accelerate(opt, model, accelerator)
    model, opt = accelerator.prepare(model, opt)
    batch = digits_dataset(1)[:]
    with pytest.warns(UserWarning, match="cannot be split"):
        with accelerator.accumulate(model):
            for piece in sub_batches(opt, batch):
                accelerator.backward(model(**piece).loss)
            opt.step()
    assert opt.optimizer.counters["fallback_steps"] == 1 and opt.optimizer.global_step == 1


def test_evaluation_forward_is_not_routed():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_vit()
    opt = FOP(model, _config("fop"))
    attach_accelerate(opt, model, accelerator)
    model, opt = accelerator.prepare(model, opt)
    batch = digits_dataset(8)[:]
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.train()
    with torch.no_grad():
        model(**batch)
    assert router_of(opt)._state == "idle"
    assert all(layer.a_sum is None for layer in opt.optimizer.layers)


def test_grad_scaler_scale_is_divided_out_of_gradients_and_curvature():
    plain = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, STEPS, clip=False)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    scaled = accelerate_loop(
        Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, STEPS, clip=False, scale=2.0**10
    )
    assert scaled["counters"] == plain["counters"]
    _assert_params_close(scaled["params"], plain["params"])
    for name, entry in plain["layers"].items():  # an S left scaled would be off by scale**2 / 4
        torch.testing.assert_close(scaled["layers"][name]["S"], entry["S"], rtol=1e-5, atol=0)


def test_overflow_discards_the_window_and_counts_a_skipped_step():
    data = digits_dataset(48)[:]
    x = data["pixel_values"].clone()
    x[BATCH + 3, 0, 0, 0] = float("inf")  # the second micro-batch of the first window overflows
    from datasets import Dataset

    poisoned = Dataset.from_dict({"pixel_values": x.numpy(), "labels": data["labels"].numpy()}).with_format("torch")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    out = accelerate_loop(accelerator, _config("fop"), BATCH, 3, clip=False, scale=2.0**10, data=poisoned)
    # three windows: the GradScaler skipped the first one's step; the next window counted it and discarded its state
    assert out["global_step"] == 2 and out["counters"]["skipped_steps"] == 1
    assert accelerator.scaler.get_scale() == 2.0**9
    assert all(torch.isfinite(v).all() for v in out["params"].values())
    for entry in out["layers"].values():
        assert torch.isfinite(entry["A"]).all() and torch.isfinite(entry["S"]).all()


# -------------------------------------------------------------- checkpoints
def test_save_state_load_state_resumes_bitwise(tmp_path):
    full = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, 4)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ckpt = str(tmp_path / "ckpt")
    first = accelerate_loop(
        Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, 2, checkpoint=ckpt, save_at=2
    )
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = accelerate_loop(Accelerator(cpu=True, gradient_accumulation_steps=2), _config("fop"), BATCH, 4, resume=ckpt)
    assert resumed["global_step"] == 4
    _assert_params_differ(first["params"], full["params"])
    for k in full["params"]:
        assert torch.equal(full["params"][k], resumed["params"][k]), k
    for name, entry in full["layers"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, resumed["layers"][name][key]), (name, key)


# ------------------------------------------------------------ two processes
def _torchrun(out: Path, *args: str) -> List[Dict]:
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
          WORKER, "--out", str(out), *args])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_processes_equal_one_process_fed_the_same_sub_batches(tmp_path):
    """Rank r takes batches r, r + 2, ... One process sees the same sub-batches with 2-batch windows (accumulation 1
    per rank), or with 4-batch windows over the batches reordered 0, 2, 1, 3, ... (accumulation 2 per rank).
    Also: resume under two processes with curvature specialists is bitwise."""
    records = _torchrun(
        tmp_path / "two", "--runs", "fop:1,kfac:1,fop:2", "--steps", str(STEPS), "--batch", str(BATCH), "--resume"
    )
    assert records[0]["world_size"] == 2
    data = digits_dataset(96)
    interleaved = data.select([i for b in (0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11) for i in range(b * BATCH, (b + 1) * BATCH)])
    for run, accum, one_data in (("fop:1", 2, data), ("kfac:1", 2, data), ("fop:2", 4, interleaved)):
        a, b = records[0][run], records[1][run]
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), (run, k)  # replicas bitwise identical
        for layer, entry in a["layers"].items():
            for key in ("A", "S"):
                assert torch.equal(entry[key], b["layers"][layer][key]), (run, layer, key)
        mode = run.split(":")[0]
        one = accelerate_loop(
            Accelerator(cpu=True, gradient_accumulation_steps=accum), _config(mode), BATCH, STEPS, data=one_data
        )
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        # factors averaged over ranks and gradients gathered: float32 rounding differs from one process
        _assert_params_close(a["params"], one["params"], atol=1e-5)
        for layer, entry in one["layers"].items():
            for key in ("A", "S"):
                torch.testing.assert_close(a["layers"][layer][key], entry[key], rtol=1e-4, atol=1e-6)
        assert a["counters"] == one["counters"] and a["counters"]["fallback_steps"] == 0
    # FOP: DDP's averaging is off (g1 must not be averaged into g2); K-FAC: DDP averages as usual
    assert records[0]["fop:1"]["ddp_allreduced"] == 0 and records[1]["fop:2"]["ddp_allreduced"] == 0
    assert records[0]["kfac:1"]["ddp_allreduced"] > 0
    _assert_params_differ(records[0]["fop:1"]["params"], records[0]["kfac:1"]["params"])
    for record in records:  # save_state / load_state under two processes: bitwise the uninterrupted run
        assert record["resumed"]["global_step"] == 4
        for k in record["full"]["params"]:
            assert torch.equal(record["full"]["params"][k], record["resumed"]["params"][k]), k


# ------------------------------------------------------------------ example
@pytest.mark.parametrize("optimizer,accum", [("fop", 1), ("kfac", 2), ("adamw", 1)])
def test_example_no_trainer_smoke_reports_accuracy(tmp_path, optimizer, accum):
    """Smoke test: the example script runs a few steps with each optimizer and prints a test accuracy."""
    out = _run_example(
        tmp_path / "ex", "--max_train_steps", "3", "--checkpointing_steps", "2", "--with_tracking",
        "--fop_optimizer", optimizer, "--gradient_accumulation_steps", str(accum),
    )
    line = [ln for ln in out.splitlines() if ln.startswith("test accuracy:")]
    assert line and f"optimizer={optimizer}, steps=3, processes=1" in line[0], out[-2000:]
    assert 0.0 <= float(line[0].split()[2]) <= 1.0
    assert (tmp_path / "ex" / "step_2").is_dir()
    assert any((tmp_path / "ex" / "runs").rglob("events.out.tfevents.*"))


def _run_example(out: Path, *args: str) -> str:
    """``main()`` of examples/run_image_classification_no_trainer.py in this process (a subprocess would spend most of
    its time importing); accelerate's process-wide state is reset around it. Returns what it printed."""
    script = load_script("examples", "run_image_classification_no_trainer")
    threads, printed = torch.get_num_threads(), io.StringIO()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        with contextlib.redirect_stdout(printed):
            script.main(["--per_device_train_batch_size", "32", "--output_dir", str(out), *args])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)  # main() applies --num_threads (1)
    return printed.getvalue()


def test_example_resumes_from_a_step_checkpoint_bitwise(tmp_path):
    from safetensors.torch import load_file

    common = ("--max_train_steps", "4", "--gradient_accumulation_steps", "2")
    _run_example(tmp_path / "full", *common, "--checkpointing_steps", "2")
    out = _run_example(tmp_path / "resumed", *common, "--resume_from_checkpoint", str(tmp_path / "full" / "step_2"))
    assert "Resumed from checkpoint" in out
    full = load_file(tmp_path / "full" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_example_runs_under_two_cpu_processes_with_accelerate_launch(tmp_path):
    """The documented `accelerate launch` command (docs/examples.md) (two gloo processes), a few steps."""
    proc = subprocess.run(
        ["accelerate", "launch", "--config_file", "examples/accelerate_cpu_2proc.yaml", "--main_process_port",
         str(_free_port()), "examples/run_image_classification_no_trainer.py", "--cpu", "--max_train_steps", "2",
         "--per_device_train_batch_size", "32", "--output_dir", str(tmp_path / "two")],
        cwd=ROOT, env=single_thread_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("test accuracy:")]
    assert len(lines) == 1 and "steps=2, processes=2" in lines[0], proc.stdout[-2000:]  # printed by the main process
