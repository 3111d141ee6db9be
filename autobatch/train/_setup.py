"""Setup steps of ``autobatch.fit`` kept out of the loop's module: device and data checks,
optimizer construction, precision, the memory probe call, micro-batch loading, DDP wrapping."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from autobatch.config import FitConfig
from autobatch.data import BatchSource
from autobatch.noise.micro_batch import trainable_parameters



def resolve_device(model: nn.Module, source: BatchSource, device: torch.device | str | None) -> torch.device:
    model_device = trainable_parameters(model)[0].device  # raises if nothing is trainable
    if device is not None:
        return torch.device(device)
    ds = source.dataset
    tensors = getattr(ds, "tensors", None)
    if tensors and tensors[0].device != model_device:
        raise ValueError(
            f"model is on {model_device} but the data tensors are on {tensors[0].device}; pass "
            f"device='{model_device}' (fit moves each batch there) or move the data"
        )
    return model_device


def build_optimizer(spec: Any, model: nn.Module, lr: float | None) -> torch.optim.Optimizer:
    if isinstance(spec, torch.optim.Optimizer):
        if lr is not None:
            for group in spec.param_groups:
                group["lr"] = lr
        return spec
    if lr is None:
        raise ValueError(
            "lr is required: the base learning rate at initial_batch_size (e.g. lr=0.1 for "
            "SGD, lr=1e-3 for Adam); autobatch.tune_lr can find it"
        )
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (got lr={lr})")
    params = trainable_parameters(model)
    if isinstance(spec, type):
        return spec(params, lr=lr)
    return spec(params, lr)


def precision_setup(precision: str, device: torch.device):
    if precision == "fp32":
        return None, None
    if precision == "bf16":
        return torch.bfloat16, None
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(
                f"precision='fp16' needs a CUDA device (got device={device}); use "
                "precision='bf16' on CPU"
            )
        return torch.float16, torch.amp.GradScaler("cuda")
    raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16' (got precision={precision!r})")


def should_probe(cfg: FitConfig, device: torch.device) -> bool:
    if cfg.memory.probe_memory is not None:
        return cfg.memory.probe_memory
    return device.type != "cpu" or cfg.memory.memory_budget is not None


def probe_micro_cap(model, source, loss_fn, optimizer, opt, device, cfg, max_b, max_micro) -> int:
    from autobatch.memory.probe import probe_memory

    factory = optimizer if not isinstance(optimizer, torch.optim.Optimizer) else (
        lambda params, lr: type(opt)(params, **{**opt.defaults, "lr": lr})
    )
    if isinstance(factory, type):
        cls = factory
        factory = lambda params, lr: cls(params, lr=lr)  # noqa: E731
    lr0 = opt.param_groups[0]["lr"]
    probe = probe_memory(
        model, source, loss_fn, optimizer=lambda params: factory(params, lr0), device=device,
        budget_bytes=cfg.memory.memory_budget, max_batch_size=max_b, margin=cfg.memory.memory_margin,
    )
    cap = probe.max_batch_size
    return min(cap, max_micro) if max_micro is not None else cap


def total_samples(epochs: float | None, max_samples: int | None, n: int) -> int | None:
    limits = [x for x in (epochs * n if epochs is not None else None, max_samples) if x is not None]
    return int(min(limits)) if limits else None


def progress_bar(cfg: FitConfig, total_samples: int | None):
    show = cfg.log.progress if cfg.log.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_samples, unit="ex", dynamic_ncols=True, file=sys.stderr)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # Buffers are broadcast once per step after the optimizer step, not in every forward:
    # a collective inside forward would hang ranks that run different micro-batch counts.
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


class MicroBatchLoader:
    """Collates a step's micro-batches, in the main process or with DataLoader workers.

    With workers, one persistent DataLoader serves every step: its batch sampler is pointed
    at the step's micro-batch index lists, so workers collate them in parallel while the
    order stays exactly the stream's.
    """

    def __init__(self, source: BatchSource, num_workers: int, *, pin: bool) -> None:
        self.source = source
        self._plan: list[list[int]] = []
        self._loader = None
        if num_workers > 0:
            self._loader = torch.utils.data.DataLoader(
                source.dataset, batch_sampler=_PlanSampler(self), num_workers=num_workers,
                collate_fn=source.collate_fn, persistent_workers=True, pin_memory=pin,
            )

    def micro_batches(self, indices: torch.Tensor, sizes: list[int]):
        chunks = torch.split(indices, sizes)
        if self._loader is None:
            for chunk in chunks:
                yield len(chunk), self.source.batch(chunk)
            return
        self._plan = [c.tolist() for c in chunks]
        yield from zip(sizes, self._loader)

    def close(self) -> None:
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()  # type: ignore[attr-defined]


class _PlanSampler:
    def __init__(self, owner: MicroBatchLoader) -> None:
        self.owner = owner

    def __iter__(self):
        return iter(self.owner._plan)

    def __len__(self) -> int:
        return len(self.owner._plan)
