"""Plain-PyTorch multi-process FOP runs (real gloo processes, started by torchrun) and their 1-process references.

Model: a small MLP on synthetic data; each (step, rank, micro-batch) has its own
deterministic batch, so one process can be fed exactly the sub-batches the
ranks see: sub-batch 1 (g1) = the even ranks' batches, sub-batch 2 (g2) = the
odd ranks'. Used by tests/test_distributed.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Dict, List, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_fop import FOP  # noqa: E402
from worker_exit import leave_worker  # noqa: E402

BATCH = 6


class MLP(nn.Module):
    """``6 -> 8 -> (8 -> 8 when use_extra) -> 4`` with a LayerNorm (AdamW-managed) in between."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.extra = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 4, bias=False)

    def forward(self, x: Tensor, use_extra: bool = False) -> Tensor:
        h = torch.tanh(self.norm(self.fc1(x)))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.fc2(h)


def batch(step: int, rank: int, micro: int) -> tuple:
    """The batch rank ``rank`` sees at micro-batch ``micro`` of step ``step``: ``x (BATCH, 6)``, ``y (BATCH,)``."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    x = torch.randn(BATCH, 6, generator=g)
    y = torch.randint(0, 4, (BATCH,), generator=g)
    return x, y


def make_opt(model: nn.Module, mode: str, inverse_interval: int, scenario: str = "plain", **extra: Any) -> FOP:
    """``scenario="unused"`` fixes beta* = 0: a layer only one group uses has g1 - g2 parallel to g_avg, so g_perp
    is rounding noise and beta* = D / E amplifies it (the runs would differ by noise, not by a bug)."""
    extra.setdefault("stagger_refresh", False)  # every layer decomposed on a cycle's first step, unless asked
    extra.setdefault("factor_interval", 1)
    return FOP(model, lr=0.05, damping=0.05, mode=mode, momentum=0.5, inverse_interval=inverse_interval,
               factor_decay=0.8, use_beta=scenario != "unused", **extra)


def uses_extra(scenario: str, rank: int) -> bool:
    """``scenario="unused"``: layer ``extra`` runs on even ranks only (g1's side)."""
    return scenario == "unused" and rank % 2 == 0


def single_process(world_size: int, mode: str, steps: int, accum: int, inverse_interval: int, scenario: str,
                   resume: str = "", save: str = "", save_at: int = -1, **extra: Any) -> Dict[str, Any]:
    """One process fed the ranks' batches: even ranks' in sub-batch 1, odd ranks' in sub-batch 2 (FOP), all (K-FAC).

    ``resume``: start from a checkpoint file written by :func:`save_checkpoint`; ``save``: write one after
    ``save_at`` steps; ``extra``: more FOP options (:func:`job_options`)."""
    model = MLP()
    opt = make_opt(model, mode, inverse_interval, scenario, **extra)
    start = load_checkpoint(resume, model, opt) if resume else 0
    w1 = ((world_size + 1) // 2) / world_size
    for step in range(start, steps):
        if step == save_at:
            save_checkpoint(save, model, opt)
        groups = [list(range(0, world_size, 2)), list(range(1, world_size, 2))] if mode == "fop" else [list(range(world_size))]
        for index, ranks in enumerate(groups):
            ctx = opt.sub_batch(index, w1) if mode == "fop" else contextlib.nullcontext()
            with ctx:
                for micro in range(accum):
                    parts = [batch(step, r, micro) for r in ranks]
                    x = torch.cat([p[0] for p in parts])
                    y = torch.cat([p[1] for p in parts])
                    (F.cross_entropy(model(x, uses_extra(scenario, ranks[0])), y) / accum).backward()
        opt.step()
        opt.zero_grad()
    return record(model, opt)


def job_options(text: str) -> Dict[str, Any]:
    """``"damping_mode=relative;kl_clip=none;stagger_refresh=true;max_eigh_dim=4;block_tolerance=0.05"`` -> FOP keyword
    arguments (``none`` -> ``None``, ``true``/``false`` -> booleans, digits -> ``int``, ``0.05`` -> ``float``)."""
    out: Dict[str, Any] = {}
    for item in filter(None, text.split(";")):
        key, value = item.split("=")
        if value.isdigit():
            out[key] = int(value)
        elif value.replace(".", "", 1).isdigit():
            out[key] = float(value)
        else:
            out[key] = {"none": None, "true": True, "false": False}.get(value, value)
    return out


def save_checkpoint(path: str, model: nn.Module, opt: FOP) -> None:
    """Model and optimizer state in one file (what a Trainer checkpoint holds for these tests)."""
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)


def load_checkpoint(path: str, model: nn.Module, opt: FOP) -> int:
    """Load :func:`save_checkpoint`'s file; returns the step to continue from."""
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return opt.global_step


def record(model: nn.Module, opt: FOP) -> Dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "layers": opt.engine.state_dict(),
        "counters": dict(opt.counters),
        "diagnostics": opt.diagnostics(),  # beta, s_proj, ... of the last step (signs depend on g1 - g2's)
    }


def worker(opts: argparse.Namespace) -> NoReturn:
    """One rank: trains, records parameters, factors (after a final sync) and bytes handed to collectives per step."""
    import torch.distributed as dist

    from hf_fop.distributed import DualGradientReducer

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = MLP()
    opt = make_opt(model, opts.mode, opts.inverse_interval, opts.scenario, stagger_refresh=opts.stagger)
    reducer = DualGradientReducer(opt) if opts.mode == "fop" else None
    comm = opt.distributor.comm  # counts every byte: gradients (reducer) and factors (distributor)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if opts.mode == "kfac" else None
    net = ddp if ddp is not None else model
    hooked = None  # --compare_hook: a second FOP model reduced by the DDP comm hook, fed the same batches
    if opts.compare_hook:
        h_model = MLP()
        h_opt = make_opt(h_model, opts.mode, opts.inverse_interval, opts.scenario)
        h_reducer = DualGradientReducer(h_opt)
        h_ddp = torch.nn.parallel.DistributedDataParallel(h_model, find_unused_parameters=True)
        assert h_reducer.attach_ddp(h_ddp)
        # where the hook cannot be used, attach_ddp says so (one log line) and the caller keeps reduce_gradients
        probe = DualGradientReducer(make_opt(MLP(), opts.mode, opts.inverse_interval, opts.scenario))
        assert not probe.attach_ddp(MLP())  # not DistributedDataParallel
        taken = torch.nn.parallel.DistributedDataParallel(MLP(), find_unused_parameters=True)
        taken.register_comm_hook(None, lambda state, bucket: torch.futures.Future())  # DDP takes one hook only
        assert not probe.attach_ddp(taken) and probe.hook is None
        hooked = (h_model, h_opt, h_reducer, h_ddp)
    bytes_per_step: List[int] = []
    pending: List[bool] = []
    for step in range(opts.steps):
        before = comm.bytes_reduced
        for micro in range(opts.accum):
            x, y = batch(step, rank, micro)
            if opts.scenario == "nonfinite" and step == 1 and rank == world_size - 1:
                x = x.clone()
                x[0, 0] = 3e19  # A overflows on this rank only; LayerNorm keeps the gradients finite
            sync = ddp.no_sync() if ddp is not None and micro < opts.accum - 1 else contextlib.nullcontext()
            with sync:
                (F.cross_entropy(net(x, uses_extra(opts.scenario, rank)), y) / opts.accum).backward()
            if hooked is not None:  # DDP syncs (the hook runs) on the last micro-batch only
                h_sync = hooked[3].no_sync() if micro < opts.accum - 1 else contextlib.nullcontext()
                with h_sync:
                    (F.cross_entropy(hooked[3](x, uses_extra(opts.scenario, rank)), y) / opts.accum).backward()
        if opts.mode == "fop":
            reducer.reduce_gradients()
        if hooked is not None:
            hooked[2].finish_hook()
            for p, q in zip(model.parameters(), hooked[0].parameters()):  # g_avg bitwise, before clipping/steps
                assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad))
            hooked[1].step()
            hooked[1].zero_grad()
        opt.step()
        opt.zero_grad()
        bytes_per_step.append(comm.bytes_reduced - before)
        pending.append(opt.distributor.partial)
    out = {"pending": pending, "bytes_per_step": bytes_per_step}
    opt.sync_curvature()
    out.update(record(model, opt))
    if hooked is not None:
        hooked[1].sync_curvature()
        out["hook"] = record(hooked[0], hooked[1])
        out["hook"]["bytes"] = hooked[2].bytes_reduced
    torch.save(out, os.path.join(opts.out, f"rank{rank}.pt"))
    leave_worker()


def specialist_runs(opts: argparse.Namespace) -> NoReturn:
    """Several runs in one launch (``--job name,mode,sharding,scenario,resume,save_at[,options]``), then
    ``--eigh_failure``.

    ``resume``: ``-`` (from scratch) or a checkpoint path (``{out}`` is replaced by ``--out``); ``save_at``: ``-`` or
    the step before which rank 0 writes ``{out}/{name}_{step}.pt`` (after the collective that gathers the full
    state on every rank); ``options``: :func:`job_options`. Each run records parameters, factors, bytes per step and the owner assignment.
    """
    import datetime

    import torch.distributed as dist

    from hf_fop.distributed import DualGradientReducer

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    out: Dict[str, Any] = {}
    for spec in opts.job:
        name, mode, sharding, scenario, resume, save_at, *more = spec.split(",")
        model = MLP()
        opt = make_opt(model, mode, opts.inverse_interval, scenario, curvature_sharding=sharding,
                       **job_options(more[0] if more else ""))
        reducer = DualGradientReducer(opt, owner_gradients=True) if mode == "fop" else None
        comm = opt.distributor.comm
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if mode == "kfac" else None
        net = ddp if ddp is not None else model
        start = load_checkpoint(resume.replace("{out}", opts.out), model, opt) if resume != "-" else 0
        bytes_per_step: List[int] = []
        for step in range(start, opts.steps):
            if save_at != "-" and step == int(save_at):
                opt.sync_curvature()  # every rank: the full state, then rank 0 saves it
                if rank == 0:
                    save_checkpoint(os.path.join(opts.out, f"{name}_{step}.pt"), model, opt)
                dist.barrier()
            before = comm.bytes_reduced
            for micro in range(opts.accum):
                x, y = batch(step, rank, micro)
                sync = ddp.no_sync() if ddp is not None and micro < opts.accum - 1 else contextlib.nullcontext()
                with sync:
                    (F.cross_entropy(net(x, uses_extra(scenario, rank)), y) / opts.accum).backward()
            if scenario == "nangrad" and step == 1 and rank == 0:  # a NaN in fc2, which rank 1 owns (2 processes)
                model.fc2.weight.grad[0, 0] = float("nan")
            if mode == "fop":
                reducer.reduce_gradients()
            opt.step()
            opt.zero_grad()
            bytes_per_step.append(comm.bytes_reduced - before)
        owners = dict(getattr(opt.distributor, "owner", {}))
        opt.sync_curvature()
        out[name] = {**record(model, opt), "bytes_per_step": bytes_per_step, "owners": owners,
                     "pending": opt.distributor.partial}
        opt.release()
    if opts.eigh_failure:
        out["eigh_failure"] = eigh_failure(rank)
    if opts.bfloat16_answer:
        out["bfloat16_answer"] = bfloat16_answer(rank)
    torch.save(out, os.path.join(opts.out, f"rank{rank}.pt"))
    leave_worker()


def eigh_failure(rank: int) -> Dict[str, Any]:
    """Specialists, eigendecomposition every step, ``max_eigh_failures=2``: from step 1 on, layer fc1's A fails in
    float32 (``LinAlgError``) and float64 (NaN) on its owner only. Step 1 keeps the last basis; step 2 must raise on
    every rank (no hang). Returns what this rank saw."""
    import time
    import warnings

    from hf_fop import refresh
    from hf_fop.distributed import DualGradientReducer

    model = MLP()
    opt = FOP(model, lr=0.05, damping=0.05, inverse_interval=1, max_eigh_failures=2, curvature_sharding="specialists")
    reducer = DualGradientReducer(opt, owner_gradients=True)
    fc1 = next(layer for layer in opt.layers if layer.name == "fc1")
    owner = opt.distributor.owner["fc1"]
    real32, real64 = refresh.eigh_float32, refresh.eigh_float64
    calls = {"float64": 0}

    def broken32(mat: Tensor) -> Any:
        if opt.global_step >= 1 and mat.data_ptr() == fc1.A.data_ptr():
            raise torch.linalg.LinAlgError("injected float32 failure")
        return real32(mat)

    def broken64(mat: Tensor) -> Any:
        if opt.global_step >= 1 and mat.data_ptr() == fc1.A.data_ptr():
            calls["float64"] += 1
            return torch.full((mat.shape[0],), float("nan")), mat
        return real64(mat)

    if rank == owner:
        refresh.eigh_float32, refresh.eigh_float64 = broken32, broken64
    seen: Dict[str, Any] = {"owner": owner, "error": None, "warnings": []}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(4):
                q_before = fc1.basis_a.q.clone() if fc1.basis_a is not None else None
                x, y = batch(step, rank, 0)
                F.cross_entropy(model(x), y).backward()
                reducer.reduce_gradients()
                opt.step()
                opt.zero_grad()
                if step == 1 and rank == owner:
                    seen["kept_basis"] = torch.equal(fc1.basis_a.q, q_before)
                    seen["failures_after_1"] = dict(fc1.eigh_failures)
    except RuntimeError as err:
        seen["error"] = str(err)
    finally:
        refresh.eigh_float32, refresh.eigh_float64 = real32, real64
        seen["warnings"] = [str(w.message) for w in caught]
    seen.update(step=opt.global_step, seconds=time.perf_counter() - t0, float64_calls=calls["float64"])
    return seen


def bfloat16_answer(rank: int) -> Dict[str, bool]:
    """The ranks first disagree on whether this CPU multiplies bfloat16 faster (rank 1 says yes); a replicated FOP
    with a 256-wide layer (``rotation_dtype="auto"`` would time it) makes every rank take rank 0's answer. Returns
    this rank's answer before and after, and the dtype it then rotates the layer in."""
    from hf_fop.preconditioner import native_bfloat16, pin_native_bfloat16, rotation_dtype

    cpu = torch.device("cpu")
    pin_native_bfloat16(cpu, rank == 1)
    before = native_bfloat16(cpu)
    opt = FOP(nn.Linear(256, 256), curvature_sharding="replicated")
    seen = {"before": before, "after": native_bfloat16(cpu), "dtype": str(rotation_dtype(opt.config, opt.layers[0]))}
    opt.release()
    return seen


def main(argv: Any = None) -> NoReturn:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", default="fop", choices=["fop", "kfac"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--inverse_interval", type=int, default=3)
    parser.add_argument("--scenario", default="plain", choices=["plain", "unused", "nonfinite"])  # --job: also "nangrad"
    parser.add_argument("--compare_hook", action="store_true", help="also train a copy through the DDP comm hook")
    parser.add_argument("--stagger", action="store_true", help="stagger_refresh=True (spread eigendecompositions)")
    parser.add_argument("--job", action="append", default=[], help="name,mode,sharding,scenario,resume,save_at[,options]")
    parser.add_argument("--eigh_failure", action="store_true", help="after the runs: a forced eigh failure on one owner")
    parser.add_argument("--bfloat16_answer", action="store_true", help="after the runs: the ranks agree on bfloat16")
    opts = parser.parse_args(argv)
    specialist_runs(opts) if opts.job else worker(opts)


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(540, exit=True)  # a hang (e.g. a collective one rank skipped) fails with every thread's stack, before the tests' 600 s timeout (generous: a loaded 2-core machine runs these 2-10x slower)
    main()
