"""Every CUDA code path of autobatch, exercised once, in under two minutes on one GPU.

The test suite runs on CPU; this script is the check to run on a CUDA machine (after a
change to the probe, the training loop, mixed precision or the data path):

- ``probe_estimate``: the memory probe's fake-tensor estimate on the GPU against the same two
  Adam steps run for real, for an MLP, a CNN with BatchNorm and a small transformer, in fp32
  and bf16, at two batch sizes each. It passes when every estimate is within 1% of the real
  steps' live tensor storages (counted at the dispatcher, as the estimate counts); the
  allocator's peak (``torch.cuda.max_memory_allocated``) is reported beside it, its excess
  being scratch that kernels allocate inside one op (cuDNN workspaces, for instance).
- ``probe_real_oom``: ``probe_memory(mode="real")`` on a device made small with
  ``torch.cuda.set_per_process_memory_fraction`` and a budget twice that size, so the
  estimate overshoots, the first real step runs out of memory for real, and the probe
  backs off to a size whose real steps fit under the device limit.
- ``fp16_inf_skip``: ``fit(precision="fp16")`` (GradScaler) with an inf injected into a
  gradient on chosen steps: those steps leave the weights untouched, the others update
  them, and GradScaler never raises "No inf checks were recorded prior to update".
- ``bf16_autocast``: ``fit(precision="bf16")``: layers run in bfloat16, in the memory probe's
  steps as in training, and the loss falls.
- ``pinned_workers``: ``fit`` with DataLoader workers and pinned host memory (num_workers=2
  on CUDA) against the same fit loading in the main process: the same weights.
- ``nccl_one_process``: a one-process ``nccl`` group (world_size 1, in a subprocess): an
  all-reduce, then ``fit`` under the initialised group.
- ``lightning`` and ``hf_trainer``: the two integrations on their examples' unchanged models
  (the Lightning callback with ``precision="bf16-mixed"``, ``AdaptiveBatchTrainer`` with
  ``bf16=True``): the model trains on the GPU, B changes and the loss falls.
- ``checkpoint_resume``: a fit with dropout stopped and resumed from its checkpoint (CUDA
  RNG states, ``weights_only`` load) against one uninterrupted run: the same weights.

Every fit is given ``device=torch.device("cuda")``, without an index, as users write it (the
model's tensors report ``cuda:0``).

It prints a table of the checks (pass, FAIL or skipped) and a tally that counts skipped checks
apart from passed ones, and writes ``benchmarks/results/gpu_check.json`` (the rows, and the
tally as ``{"passed": n, "skipped": n, "failed": n}``). A check that cannot run where it is
(``probe_real_oom`` in ``--smoke-cpu`` mode) is skipped, not passed. Without CUDA it says it
needs a GPU, reports every check as skipped and exits 0 (writing JSON only with an explicit
``--out``). Exit status 1 if a check failed, 0 otherwise: a run in which every check was
skipped checked nothing, and its tally says so.

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --smoke-cpu   # the same code on CPU (fp32, gloo, no probe)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
MiB = 2**20
PASS, FAIL, SKIPPED = "pass", "FAIL", "skipped"


class SkipCheck(Exception):
    """Raised by a check that cannot run on this device: its row is skipped, with the reason
    as its detail (never counted as a pass)."""


def _problem(n: int = 4096, width: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    y = (x[:, :10] + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)  # learnable labels
    return x, y


def _mlp(width: int = 256, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))


def _fit(model: nn.Module, data, device: torch.device, **kw):
    import autobatch

    args = {"loss_fn": nn.functional.cross_entropy, "lr": 0.05, "max_steps": 12, "policy": "fixed",
            "initial_batch_size": 256, "device": device, "progress": False}
    args.update(kw)
    return autobatch.fit(model.to(device), data, **args)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item()
               for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all().item() for p in model.parameters())


# -- the checks: each returns (passed, detail) or raises SkipCheck -------------------------------
def check_probe_real_oom(device: torch.device) -> tuple[bool, str]:
    from autobatch import probe_memory

    if device.type != "cuda":
        raise SkipCheck("on CPU (the device limit is what this exercises)")
    limit = 512 * MiB
    torch.cuda.empty_cache()
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(limit / total, index)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 10)).to(device)
        example = (torch.randn(4, 1024), torch.randint(0, 10, (4,)))
        # The budget claims twice what the allocator allows: the estimate overshoots.
        probe = probe_memory(model, example, nn.functional.cross_entropy, torch.optim.Adam, device=device,
                             budget_bytes=2 * limit, margin=0.1, max_micro_batch_size=2**17, mode="real")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
        torch.cuda.empty_cache()
    ooms = sorted(b for b, peak in probe.measured.items() if peak is None)
    best = probe.max_micro_batch_size
    peak = probe.measured.get(best)
    ok = bool(ooms) and peak is not None and peak <= limit and best < min(ooms)
    return ok, (f"real OOM at batch {ooms}, backed off to {best} "
                f"(peak {(peak or 0) / MiB:.0f} MiB, device limit {limit / MiB:.0f} MiB, {probe.real_steps} real steps)")


def check_fp16_inf_skip(device: torch.device) -> tuple[bool, str]:
    import autobatch

    precision = "fp16" if device.type == "cuda" else "fp32"  # fp16 needs CUDA (GradScaler)
    inject = {3, 7}  # not adjacent: a run of non-finite steps is an error of its own
    done, injected, unchanged, changed = [0], set(), set(), set()
    torch.manual_seed(0)
    model = _mlp().to(device)
    last = [[p.detach().clone() for p in model.parameters()]]

    def poison(grad: torch.Tensor) -> torch.Tensor:
        if done[0] + 1 in inject:
            injected.add(done[0] + 1)
            return torch.full_like(grad, math.inf)
        return grad

    class Watch(autobatch.Callback):
        def on_step_end(self, record) -> None:
            now = [p.detach().clone() for p in model.parameters()]
            same = all(torch.equal(a, b) for a, b in zip(last[0], now))
            (unchanged if same else changed).add(record.step)
            last[0], done[0] = now, record.step

    model[0].weight.register_hook(poison)
    result = _fit(model, _problem(), device, precision=precision, callbacks=[Watch()])
    ok = injected == inject and inject <= unchanged and len(changed) >= 8 and _finite(model)
    return ok, (f"{precision}: inf injected at steps {sorted(injected)}, weights unchanged at "
                f"{sorted(unchanged)}, updated at {len(changed)} steps; skipped_steps={result.skipped_steps}")


def check_bf16_autocast(device: torch.device) -> tuple[bool, str]:
    torch.manual_seed(0)
    model = _mlp()
    dtypes = set()
    model[0].register_forward_hook(lambda module, inputs, out: dtypes.add(out.dtype))
    result = _fit(model, _problem(), device, precision="bf16", max_steps=30, lr=0.1)
    first, final = result.history[0].train_loss, result.history[-1].train_loss
    ok = dtypes == {torch.bfloat16} and final < first and _finite(model)
    return ok, f"layer outputs {sorted(map(str, dtypes))}, train loss {first:.3f} -> {final:.3f}"


def _pinned_handouts() -> int | None:
    """Blocks the pinned host allocator has handed out so far (None: not observable)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.host_memory_stats().get("active_requests.allocated")


def check_pinned_workers(device: torch.device) -> tuple[bool, str]:
    models = {}
    pinned = None
    for workers in (0, 2):
        before = _pinned_handouts()
        torch.manual_seed(0)
        models[workers] = model = _mlp()
        _fit(model, _problem(), device, num_workers=workers)
        after = _pinned_handouts()
        if workers and device.type == "cuda" and before is not None and after is not None:
            pinned = after - before
    diff = _max_diff(models[0], models[2])
    ok = diff == 0.0 and (pinned is None or pinned > 0)
    where = (f"{pinned} pinned host blocks handed out" if pinned is not None
             else "pinning not observable" if device.type == "cuda" else "no pinning on CPU")
    return ok, f"num_workers=2 vs 0: max weight difference {diff:.3g}; {where}"


def check_nccl_one_process(device: torch.device) -> tuple[bool, str]:
    out = subprocess.run(
        [sys.executable, __file__, "--nccl-worker", device.type], capture_output=True, text=True, timeout=120,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"worker exit {out.returncode}: {tail}"
    report = json.loads(lines[-1])
    ok = report["all_reduce"] == 1.0 and report["world_size"] == 1 and report["finite"]
    return ok, (f"backend {report['backend']}, world_size {report['world_size']}: all_reduce ok, fit of "
                f"{report['steps']} steps under the group (world_size 1: fit runs without DDP)")


def _nccl_worker(device_type: str) -> None:
    import torch.distributed as dist

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        t = torch.ones(4, device=device)
        dist.all_reduce(t)
        torch.manual_seed(0)
        model = _mlp()
        result = _fit(model, _problem(), device)
        dist.barrier()
        print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                          "all_reduce": t.max().item(), "steps": result.steps, "finite": _finite(model)}))
    finally:
        dist.destroy_process_group()


def check_fsdp_one_process(device: torch.device) -> tuple[bool, str]:
    """fit on a model sharded with FSDP2 ``fully_shard`` (each block, then the root) in a
    one-process group (nccl on CUDA), against the same model unsharded: the same weights."""
    out = subprocess.run(
        [sys.executable, __file__, "--fsdp-worker", device.type], capture_output=True, text=True, timeout=300,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"worker exit {out.returncode}: {tail}"
    report = json.loads(lines[-1])
    ok = report["max_diff"] <= 1e-4 and report["steps"] == report["expected_steps"]
    return ok, (f"backend {report['backend']}: {report['steps']} steps of a 2-block transformer sharded with "
                f"fully_shard vs unsharded, max weight difference {report['max_diff']:.3g}")


def _fsdp_worker(device_type: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from autobatch.testing import BlockTransformer, markov_tokens, token_cross_entropy

    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))
    try:
        x, y = markov_tokens(256, vocab=16, length=8, seed=1)
        args = dict(loss_fn=token_cross_entropy, lr=0.2, max_steps=10, initial_batch_size=16, policy="fixed",
                    gns_method="off", lr_scaling="none", shuffle=False, progress=False, device=device)
        models = []
        for shard in (False, True):
            torch.manual_seed(0)
            model = BlockTransformer(vocab=16, width=32, length=8, depth=2).to(device)
            if shard:
                mesh = init_device_mesh(device.type, (1,))
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            result = _fit_any(model, (x, y), args)
            models.append(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                          if shard else {k: v.cpu() for k, v in model.state_dict().items()})
        diff = max(float((models[0][k] - models[1][k]).abs().max()) for k in models[0])
        print(json.dumps({"backend": dist.get_backend(), "steps": result.steps, "expected_steps": 10, "max_diff": diff}))
    finally:
        dist.destroy_process_group()


def _fit_any(model: nn.Module, data, args: dict):
    import autobatch

    return autobatch.fit(model, data, **args)


def check_checkpoint_resume(device: torch.device) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        def run(max_steps: int, directory: str) -> nn.Module:
            torch.manual_seed(0)
            model = _mlp(dropout=0.2)
            _fit(model, _problem(), device, max_steps=max_steps, checkpoint_dir=directory, resume=True,
                 policy="gns", initial_batch_size=64, decide_every=2)
            return model

        full = run(20, os.path.join(tmp, "full"))
        run(9, os.path.join(tmp, "part"))
        torch.manual_seed(123)  # the resumed run must restore every RNG, CUDA's included
        resumed = run(20, os.path.join(tmp, "part"))
    diff = _max_diff(full, resumed)
    return diff == 0.0, f"stopped at 9 of 20 steps, resumed: max weight difference {diff:.3g}"


def _estimate_cases() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple], Callable, tuple[int, int]]]:
    """Models for the estimate check: (model factory, batch of n, loss, two batch sizes)."""
    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))

    def cnn_bn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                             nn.Conv2d(64, 128, 3, stride=2), nn.BatchNorm2d(128), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(1000, 256)
            layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.1, batch_first=True)
            self.body = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = nn.Linear(256, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(self.emb(x)))

    def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    ce = nn.functional.cross_entropy
    return {
        "mlp": (mlp, lambda n: (torch.randn(n, 1024), torch.randint(0, 10, (n,))), ce, (256, 4096)),
        "cnn_bn": (cnn_bn, lambda n: (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), ce, (64, 512)),
        "transformer": (LM, lambda n: (torch.randint(0, 1000, (n, 128)), torch.randint(0, 1000, (n, 128))),
                        lm_loss, (16, 128)),
    }


def _measured_peak(model: nn.Module, batch: tuple, loss_fn: Callable, amp: torch.dtype | None,
                   device: torch.device) -> tuple[int, int]:
    """Peak bytes of the probe's workload run for real on ``device`` (two Adam steps, the
    gradients set to None after the second), two ways: the device allocator's peak (CUDA; the
    second figure on CPU) and the live tensor storages counted at the dispatcher (what the
    fake-tensor estimate counts: no scratch an op allocates and frees inside itself).
    Parameters, buffers and the batch are counted as resident."""
    import contextlib

    from autobatch.memory._count import LiveStorageBytes

    opt = torch.optim.Adam(model.parameters())
    resident = sum(t.untyped_storage().nbytes() for t in (*model.parameters(), *model.buffers(), *batch))
    counter = LiveStorageBytes(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with counter:
        counter.track(model, batch)
        for _ in range(2):
            with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
                loss = loss_fn(model(*batch[:-1]), batch[-1])
            loss.backward()
            del loss
            opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type != "cuda":
        return counter.peak_bytes, counter.peak_bytes
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before + resident, counter.peak_bytes


#: the estimate may differ from the real steps' live-storage count by this fraction at most
ESTIMATE_TOLERANCE = 0.01


def check_probe_estimate(device: torch.device) -> tuple[bool, str]:
    """The probe's fake-tensor estimate on the device against the same steps run for real:
    their live-storage count (must agree) and the allocator's peak (the gap is scratch that
    kernels allocate inside one op, e.g. cuDNN workspaces, which no storage count sees)."""
    from autobatch import probe_memory

    precisions = {"fp32": None, "bf16": torch.bfloat16}
    rows, worst = [], 0.0
    for name, (make_model, make_batch, loss_fn, sizes) in _estimate_cases().items():
        for precision, amp in precisions.items():
            for n in sizes if device.type == "cuda" else (4,):  # smoke mode: the code path only
                torch.manual_seed(0)
                model = make_model().to(device)
                estimate = probe_memory(model, make_batch(2), loss_fn, torch.optim.Adam, device=device,
                                        budget_bytes=2**40, max_micro_batch_size=n, margin=0,
                                        mode="estimate", precision=precision).peak_bytes_at_max
                batch = tuple(t.to(device) for t in make_batch(n))
                allocator, counted = _measured_peak(model, batch, loss_fn, amp, device)
                worst = max(worst, abs(estimate / counted - 1))
                rows.append(f"{name}/{precision}/{n} {estimate / counted:.3f} of the count, "
                            f"{estimate / allocator:.3f} of the allocator's {allocator / MiB:.0f} MiB")
                del model, batch
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return worst <= ESTIMATE_TOLERANCE, "estimate / real peak: " + "; ".join(rows)


def _example(name: str):
    """A module of ``examples/`` (not a package), loaded from its file."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_lightning(device: torch.device) -> tuple[bool, str]:
    """The Lightning callback on the example's unchanged LightningModule, on the GPU in bf16."""
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from autobatch.integrations.lightning import AdaptiveBatchSize

    ex = _example("lightning_example")
    warnings.filterwarnings("ignore", module="lightning")
    torch.manual_seed(0)
    model = ex.MNIST1DClassifier()
    (x, y), (x_val, y_val) = model.example.train_data, model.example.val_data
    adaptive = AdaptiveBatchSize(max_batch_size=1024)
    trainer = pl.Trainer(max_epochs=2, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         precision="bf16-mixed", callbacks=[adaptive], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(x_val, y_val), batch_size=500))
    history, accuracy = adaptive.history, float(trainer.callback_metrics["val_accuracy"])
    sizes = sorted({r.batch_size for r in history})
    on = trainer.strategy.root_device  # (the model itself is back on the CPU after fit)
    ok = on.type == device.type and len(sizes) > 1 and accuracy > 0.3 and math.isfinite(history[-1].train_loss)
    return ok, (f"{len(history)} steps on {on}, B in {sizes[0]}..{sizes[-1]}, val_accuracy {accuracy:.3f} "
                "(chance 0.1)")


def check_hf_trainer(device: torch.device) -> tuple[bool, str]:
    """AdaptiveBatchTrainer on the example's tiny GPT-2, on the GPU in bf16."""
    import tempfile

    from transformers import TrainingArguments
    from transformers.utils import logging

    from autobatch.integrations.transformers import AdaptiveBatchTrainer

    ex = _example("hf_trainer_example")
    logging.set_verbosity_error()
    train, evaluation, vocab_size = ex.make_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, num_train_epochs=2,
                                 learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to=[],
                                 use_cpu=device.type != "cuda", bf16=True, disable_tqdm=True)
        trainer = AdaptiveBatchTrainer(model=ex.tiny_gpt2(vocab_size), args=args, train_dataset=train,
                                       eval_dataset=evaluation, data_collator=ex.collate,
                                       autobatch_config={"decide_every": 5, "max_batch_size": 256})
        trainer.train()
    history = trainer.history
    first = sum(r.train_loss for r in history[:5]) / 5
    last = sum(r.train_loss for r in history[-5:]) / 5
    sizes = sorted({r.batch_size for r in history})
    on = next(trainer.model.parameters()).device
    ok = on.type == device.type and last < first - 0.5 and len(sizes) > 1
    return ok, f"{len(history)} steps on {on}, B in {sizes[0]}..{sizes[-1]}, train loss {first:.2f} -> {last:.2f}"


CHECKS: dict[str, Callable[[torch.device], tuple[bool, str]]] = {
    "probe_estimate": check_probe_estimate,
    "probe_real_oom": check_probe_real_oom,
    "fp16_inf_skip": check_fp16_inf_skip,
    "bf16_autocast": check_bf16_autocast,
    "pinned_workers": check_pinned_workers,
    "nccl_one_process": check_nccl_one_process,
    "fsdp_one_process": check_fsdp_one_process,
    "checkpoint_resume": check_checkpoint_resume,
    "lightning": check_lightning,
    "hf_trainer": check_hf_trainer,
}


def run_checks(device: torch.device) -> list[dict]:
    """Run every check on ``device``; a check that raises SkipCheck is skipped with its reason,
    one that raises anything else fails with the error's first line."""
    rows = []
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            ok, detail = check(device)
            status = PASS if ok else FAIL
        except SkipCheck as why:
            status, detail = SKIPPED, str(why)
        except Exception as err:
            lines = str(err).strip().splitlines()
            status, detail = FAIL, f"{type(err).__name__}: {lines[0] if lines else ''}"
            traceback.print_exc(file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        rows.append({"check": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
                     "detail": detail})
        print(f"  {name}: {status} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    head = ["check", "status", "seconds", "detail"]
    cells = [[r["check"], r["status"], f"{r['seconds']:.1f}", r["detail"]] for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(3)]
    return "\n".join("  ".join([*(c[i].ljust(widths[i]) for i in range(3)), c[3]]).rstrip() for c in [head, *cells])


def tally(rows: list[dict]) -> dict[str, int]:
    """How many checks passed, were skipped and failed (each row is exactly one of them)."""
    counts = {"passed": 0, "skipped": 0, "failed": 0}
    for r in rows:
        counts["passed" if r["status"] == PASS else "skipped" if r["status"] == SKIPPED else "failed"] += 1
    return counts


def verdict(counts: dict[str, int]) -> str:
    """The tally as the line printed under the table; "all ... passed" only when every check
    ran and passed."""
    total = sum(counts.values())
    if counts["failed"]:
        return f"{counts['failed']} of {total} checks FAILED ({counts['passed']} passed, {counts['skipped']} skipped)"
    if not counts["passed"]:
        return f"nothing checked: all {total} checks skipped"
    if counts["skipped"]:
        return f"{counts['passed']} of {total} checks passed, {counts['skipped']} skipped, none failed"
    return f"all {total} checks passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="JSON results (default with CUDA: benchmarks/results/gpu_check.json; none without)")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="run the checks' code on CPU (fp32 instead of fp16, gloo instead of nccl)")
    parser.add_argument("--nccl-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        _nccl_worker(args.nccl_worker)
        return 0
    if args.fsdp_worker:
        _fsdp_worker(args.fsdp_worker)
        return 0
    report = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if torch.cuda.is_available() or args.smoke_cpu:
        device = torch.device("cuda" if not args.smoke_cpu else "cpu")
        report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
        print(f"gpu_check on {report['device']} (torch {torch.__version__})", file=sys.stderr)
        start = time.perf_counter()
        rows = run_checks(device)
        report["total_seconds"] = round(time.perf_counter() - start, 1)
        out = args.out or (RESULTS if device.type == "cuda" else None)
    else:
        print("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here): every check skipped")
        report["device"] = None
        rows = [{"check": name, "status": SKIPPED, "seconds": 0.0, "detail": "no CUDA"} for name in CHECKS]
        out = args.out
    report["rows"] = rows
    report["tally"] = tally(rows)
    print(table(rows))
    print(verdict(report["tally"]))
    if "total_seconds" in report:
        print(f"total: {report['total_seconds']} s")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results: {out}")
    return 1 if report["tally"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
