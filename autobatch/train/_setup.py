"""Everything ``autobatch.fit`` sets up before its loop, gathered in one :class:`Setup`.

:func:`prepare` checks the arguments and builds, in order: the data sources, the device, the
process group, the optimizer and its base LRs, precision, the memory probe's micro-batch cap,
the controller (policy, LR rule, estimator), the sample stream, the micro-batch loader, the
norm meter (hooks) and the DDP wrapper. The loop in :mod:`autobatch.train.fit` only reads it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import math
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.accumulate import LossItems, resolve_loss_items
from autobatch.batch import AUTOCAST_DTYPES, ForwardLoss, LossFn
from autobatch.config import FitConfig
from autobatch.data import BatchSource, as_batch_source, canonical_device
from autobatch.memory.oom import MemoryBudget
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.noise.micro_batch import StepGradNorms, trainable_parameters
from autobatch.noise.per_example import per_example_supported
from autobatch.optimizers import OptimizerSpec, build_optimizer
from autobatch.policies.budget import budget_kind
from autobatch.policies import make_policy
from autobatch.scaling import default_scaling, make_scaling
from autobatch.train._validate import validate_fit_args
from autobatch.train.callbacks import Callback
from autobatch.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from autobatch.train.controller import BatchSizeController
from autobatch.train.distributed import DistInfo, setup_distributed
from autobatch.train.results import FitResult
from autobatch.train.sampler import SampleStream
from autobatch.train.step_norms import MeasureSchedule, StepNormMeter


@dataclass
class Setup:
    """What the loop of ``fit`` works with. Sizes are global unless named local.

    Attributes:
        cfg: the validated config.
        model: the model being trained (in place).
        forward_model: what the loop calls: the model, or its DDP wrapper under torchrun.
        loss_fn, forward_loss, eval_fn: as given to ``fit``.
        loss_mode: ``loss_items`` resolved: ``"examples"``, ``"tokens"`` or a count function.
        source, val_source: the training and validation data (val None if not given).
        device: where training runs.
        info: this process's rank and world size.
        opt: the optimizer; ``base_lrs`` its param groups' LRs at ``initial_batch_size``.
        scheduler: the user's LR scheduler over ``opt`` (setting the base LRs), or None.
        amp_dtype, scaler: autocast dtype and fp16 GradScaler (None for fp32).
        controller: batch size, micro-batch cap, LR factor, estimator, policy.
        stream: the seeded sample order.
        loader: collates micro-batches.
        meter: hooks and the per-step read of loss and norms.
        callbacks: the user's callbacks.
        bar: the progress bar on rank 0, or None.
        checkpoint_dir: where ``last.pt`` goes (None: no checkpoints).
        budget: bytes a step may hold when enforced by counting (CPU), else None.
        min_step: the smallest step (global examples) the model trains on.
        epochs, max_steps, max_samples: the stopping rules.
    """

    cfg: FitConfig
    model: nn.Module
    forward_model: nn.Module
    loss_fn: LossFn | None
    eval_fn: Callable[[nn.Module], dict[str, float]] | None
    source: BatchSource
    val_source: BatchSource | None
    device: torch.device
    info: DistInfo
    opt: torch.optim.Optimizer
    base_lrs: list[float]
    amp_dtype: torch.dtype | None
    scaler: Any
    controller: BatchSizeController
    stream: SampleStream
    loader: MicroBatchLoader
    meter: StepNormMeter
    forward_loss: ForwardLoss | None = None
    loss_mode: Any = "examples"
    move_batches: bool = True  # False when the data set's tensors already sit on the device
    scheduler: Any = None
    min_step: int = 1
    callbacks: list[Callback] = field(default_factory=list)
    bar: Any = None
    checkpoint_dir: Path | None = None
    budget: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    max_samples: int | None = None

    @property
    def has_eval(self) -> bool:
        return self.val_source is not None or self.eval_fn is not None

    def set_lr(self, step: int, samples: int = 0) -> None:
        """Set every param group's LR for the step after ``step`` done steps and ``samples``
        examples: its base LR times the controller's factor (rule, cap, policy schedule and
        warm-up, in one place).

        With a user's ``lr_scheduler`` the base LRs are the scheduler's, on a clock counted in
        samples: it has stepped ``samples // initial_batch_size`` times (once per B0 examples),
        so a schedule written in steps of the base batch keeps its meaning when B changes.
        The scheduler steps on the base LRs (restored into the groups first), so chainable
        schedulers never compound autobatch's factor.
        """
        factor = self.controller.lr_factor(step)
        bases = self.base_lrs
        if self.scheduler is not None:
            due = samples // self.cfg.batch.initial_batch_size
            if self.scheduler.last_epoch < due:
                for group, base in zip(self.opt.param_groups, self.scheduler.get_last_lr()):
                    group["lr"] = base
                with warnings.catch_warnings():  # "step() before optimizer.step()" after a skip
                    warnings.simplefilter("ignore", UserWarning)
                    while self.scheduler.last_epoch < due:
                        self.scheduler.step()
            bases = self.scheduler.get_last_lr()
        for group, base in zip(self.opt.param_groups, bases):
            group["lr"] = base * factor

    @property
    def base_lr(self) -> float:
        """The first param group's LR before autobatch's factor (the schedule's, if any)."""
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.base_lrs[0]

    def take(self, batch_size: int) -> tuple[torch.Tensor, int]:
        """The next step's indices, and 1 if a step too small for the model (an epoch's
        tail) was carried into it or dropped (``config.data.small_tail``), else 0."""
        indices = self.stream.take(batch_size)
        if indices.shape[0] >= self.min_step:
            return indices, 0
        if self.cfg.data.small_tail == "drop":
            return self.stream.take(batch_size), 1
        return torch.cat([indices, self.stream.take(batch_size - indices.shape[0])]), 1

    def clip_gradients(self, norms: StepGradNorms | None) -> None:
        """Clip the step's gradient to ``max_grad_norm`` (if set), after the norms were
        measured and before the optimizer step. The norm is the one the meter read (unscaled,
        over ranks): no second pass over the gradients. Under fp16 the factor applies to the
        scaled gradients, which ``scaler.step`` unscales."""
        max_norm = self.cfg.lr.max_grad_norm
        if max_norm is None:
            return
        params = self.meter._params
        if norms is not None and math.isfinite(norms.big_sq_norm):
            total = torch.tensor(math.sqrt(norms.big_sq_norm))
        else:  # gns_method="off": no norm was read
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)

    def memory_guard(self) -> contextlib.AbstractContextManager:
        """Raise an out-of-memory error when a step holds more than the budget (CPU only:
        accelerators enforce their own limit)."""
        if self.budget is None:
            return contextlib.nullcontext()
        return MemoryBudget(self.budget, baseline=(self.model, self.opt))

    def stop_reason(self, step: int, samples: int) -> str | None:
        """Which stopping rule ``step`` optimizer steps and ``samples`` examples reached, if any."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_samples is not None and samples >= self.max_samples:
            return "max_samples"
        if self.epochs is not None and self.stream.epochs_done >= self.epochs:
            return "epochs"
        return None

    def restore(self) -> FitResult | None:
        """Load ``checkpoint_dir/last.pt`` into the model, optimizer, controller, stream and
        RNGs; return the result so far, or None when there is no checkpoint."""
        ckpt = load_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        if ckpt is None:
            return None
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.controller.load_state_dict(ckpt["controller"])
        if ckpt.get("measure_schedule") is not None:  # absent from checkpoints before it existed
            self.meter.schedule.load_state_dict(ckpt["measure_schedule"])
        self.stream.load_state_dict(ckpt["stream"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        return FitResult(model=self.model, **ckpt["result"])

    def save(self, result: FitResult) -> None:
        """Write ``checkpoint_dir/last.pt`` (rank 0 only; a no-op without a directory)."""
        if self.checkpoint_dir is None or not self.info.is_main:
            return
        save_checkpoint(self.checkpoint_dir, {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "controller": self.controller.state_dict(),
            "measure_schedule": self.meter.schedule.state_dict(),
            "stream": self.stream.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": capture_rng(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "result": result.model_dump(exclude={"model"}),
        })

    def close(self) -> None:
        """Remove the hooks, stop loader workers, free the DDP wrapper, close the bar."""
        self.meter.remove()
        self.loader.close()
        if self.forward_model is not self.model:
            # Free the DDP wrapper (and its reducer) now, while the process group is alive:
            # it sits in reference cycles that the collector might only reach after the
            # group is destroyed at exit.
            self.forward_model = self.model
            gc.collect()
        if self.bar is not None:
            self.bar.close()


def prepare(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None,
    val_data: Any,
    optimizer: OptimizerSpec,
    lr: float | None,
    epochs: float | None,
    max_steps: int | None,
    max_samples: int | None,
    config: FitConfig | dict[str, Any] | None,
    callbacks: Iterable[Callback],
    device: torch.device | str | None,
    checkpoint_dir: str | Path | None,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None,
    precision: str,
    config_overrides: dict[str, Any],
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> Setup:
    """Check ``fit``'s arguments and build its :class:`Setup` (arguments as in ``fit``).

    Raises:
        ValueError: as listed in ``fit``.
    """
    # first: a bad setting fails now, not when the first checkpoint is written
    validate_fit_args(model, data, val_data, optimizer, lr, epochs, max_steps, max_samples, device,
                      checkpoint_dir)
    cfg = FitConfig.from_any(config, **config_overrides)
    if epochs is None and max_steps is None and max_samples is None:
        raise ValueError(
            "fit needs a stopping rule: give epochs, max_steps or max_samples (got all three None)"
        )
    source = as_batch_source(data, check_items=forward_loss is None)
    val_source = (as_batch_source(val_data, name="val_data", check_items=forward_loss is None)
                  if val_data is not None else None)
    device = resolve_device(model, source, device)
    model.to(device)
    info = setup_distributed(device)
    n = len(source)
    b0 = cfg.batch.initial_batch_size
    if b0 > n:
        raise ValueError(
            f"initial_batch_size={b0} is larger than the training set ({n} examples); "
            f"pass initial_batch_size <= {n}"
        )
    max_b = min(cfg.batch.max_batch_size or n, n)
    opt = make_optimizer(optimizer, model, lr)
    base_lrs = [group["lr"] for group in opt.param_groups]  # before a scheduler's first factor
    scheduler = lr_scheduler(opt) if lr_scheduler is not None else None
    amp_dtype, scaler = precision_setup(precision, device)
    max_micro = cfg.memory.max_micro_batch_size
    # the smallest micro-batch (per rank) the model trains on: BatchNorm needs 2
    min_micro = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) else 1
    if should_probe(cfg, device):
        max_micro, min_micro = probe_micro_cap(model, source, loss_fn, forward_loss, optimizer, lr,
                                               device, cfg, max_b, max_micro, precision)
    method = cfg.estimator.gns_method
    if method == "per_example" and (why := per_example_supported(model)) is not None:
        warnings.warn(f"gns_method='per_example' is not supported for this model ({why}); "
                      "measuring with micro-batch norms instead", stacklevel=3)
        method = "micro"
    controller = build_controller(
        cfg, optimizer=opt, method=method, base_batch_size=b0, max_batch_size=max_b,
        # One micro-batch per step unless memory needs more: the meter splits the steps it
        # measures itself.
        micro_batch_size=max_micro, min_micro_batches=1,
        epochs=epochs, max_steps=max_steps, max_samples=max_samples, num_examples=n,
        lr_scheduled=scheduler is not None,
    )
    est = cfg.estimator
    schedule = MeasureSchedule(est.gns_every, overhead=est.gns_overhead, base_batch=b0,
                               smoothing=est.gns_smoothing)
    meter = StepNormMeter(model, method, info, every=schedule, scaler=scaler,
                          first=round(1 / (1 - est.gns_smoothing)), estimator=controller.estimator)
    meter.min_micro = min_micro
    return Setup(
        cfg=cfg, model=model,
        # Under torchrun every forward goes through DDP, inside no_sync: gradients are summed
        # by one all-reduce after all micro-batches (see autobatch.train.distributed).
        forward_model=wrap_ddp(model, device) if info.enabled else model,
        loss_fn=loss_fn, eval_fn=eval_fn, source=source, val_source=val_source, device=device,
        info=info, opt=opt, base_lrs=base_lrs,
        amp_dtype=amp_dtype, scaler=scaler, controller=controller,
        stream=sample_stream(source, cfg),
        loader=MicroBatchLoader(source, cfg.data.num_workers, pin=device.type == "cuda"),
        meter=meter,
        forward_loss=forward_loss,
        loss_mode=resolve_loss_items(loss_items, source.batch(torch.arange(1)), loss_fn=loss_fn,
                                     forward_loss=forward_loss),
        scheduler=scheduler, min_step=min_micro * info.world_size,
        move_batches=not source.on_device(device),
        callbacks=list(callbacks),
        bar=progress_bar(cfg, total_samples(epochs, max_samples, n)) if info.is_main else None,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
        # On CPU a budget is enforced by counting live storage bytes (the same guard the probe
        # uses), so OOM handling is exercised where no device limit exists.
        budget=cfg.memory.memory_budget if device.type == "cpu" else None,
        epochs=epochs, max_steps=max_steps, max_samples=max_samples,
    )



def resolve_device(model: nn.Module, source: BatchSource, device: torch.device | str | None) -> torch.device:
    model_device = trainable_parameters(model)[0].device  # raises if nothing is trainable
    if device is not None:
        return canonical_device(device)
    ds = source.dataset
    tensors = getattr(ds, "tensors", None)
    if tensors and tensors[0].device != model_device:
        raise ValueError(
            f"model is on {model_device} but the data tensors are on {tensors[0].device}; pass "
            f"device='{model_device}' (fit moves each batch there) or move the data"
        )
    return model_device


def make_optimizer(spec: OptimizerSpec, model: nn.Module, lr: float | None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` (:mod:`autobatch.optimizers`) over the model, with an error
    saying both ways out when no LR is given anywhere."""
    try:
        return build_optimizer(spec, model.parameters(), lr)
    except ValueError as err:
        if lr is None and "lr is required" in str(err):
            raise ValueError(f"{err}. In fit: pass lr=..., an optimizer that holds its LR, or lr='auto' "
                             "to choose it with a short study first") from None
        raise


def precision_setup(precision: str, device: torch.device):
    if not isinstance(precision, str) or precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16' (got precision={precision!r})")
    if precision != "fp16":
        return AUTOCAST_DTYPES[precision], None
    if device.type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device (got device={device}); use "
            "precision='bf16' on CPU"
        )
    return AUTOCAST_DTYPES[precision], torch.amp.GradScaler("cuda")


def should_probe(cfg: FitConfig, device: torch.device) -> bool:
    if cfg.memory.probe_memory is not None:
        return cfg.memory.probe_memory
    return device.type != "cpu" or cfg.memory.memory_budget is not None


def probe_micro_cap(model: nn.Module, source: BatchSource, loss_fn: LossFn | None,
                    forward_loss: ForwardLoss | None, optimizer: OptimizerSpec, lr: float | None,
                    device: torch.device, cfg: FitConfig, max_b: int,
                    max_micro: int | None, precision: str) -> tuple[int, int]:
    """The memory probe's micro-batch cap (within ``max_micro``) and the smallest micro-batch
    the model trains on, probed at the step's ``precision`` (the autocast fit runs under).
    The probe gets the user's optimizer spec: an instance is rebuilt
    faithfully over stand-ins (:func:`autobatch.optimizers.copy_for`), a class or factory
    with fit's ``lr`` bound."""
    from autobatch.memory.probe import probe_memory

    spec = optimizer if isinstance(optimizer, torch.optim.Optimizer) else functools.partial(
        build_optimizer, optimizer, lr=lr)
    probe = probe_memory(
        model, source, loss_fn, optimizer=spec, forward_loss=forward_loss, device=device,
        budget_bytes=cfg.memory.memory_budget, max_micro_batch_size=max_b,
        margin=cfg.memory.memory_margin, precision=precision,
    )
    cap = probe.max_batch_size
    return (min(cap, max_micro) if max_micro is not None else cap), probe.min_batch_size


def sample_stream(source: BatchSource, cfg: FitConfig) -> SampleStream:
    """The seeded sample order, or the DataLoader sampler's (one epoch = one pass of it)."""
    if source.sampler is None:
        return SampleStream(len(source), shuffle=cfg.data.shuffle, seed=cfg.data.seed)
    seed = cfg.data.seed
    first = source.sampler_order(0, seed)
    return SampleStream(len(first), seed=seed, order=lambda epoch: source.sampler_order(epoch, seed))


def total_samples(epochs: float | None, max_samples: int | None, n: int) -> int | None:
    """Examples the run may process: the smaller of ``epochs x n`` and ``max_samples``
    (None when neither is given)."""
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
        chunks = torch.split(indices, sizes) if len(sizes) > 1 else (indices,)
        if self._loader is None:
            for size, chunk in zip(sizes, chunks):
                yield size, self.source.batch(chunk)
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


def resolve_base_lr(lr: Any, model: nn.Module, data: Any, *, checkpoint_dir: Any, resume: bool,
                    config: Any, config_overrides: dict[str, Any], **fit_args: Any) -> tuple[Any, Any]:
    """``(lr, search)``: ``lr`` unchanged with ``search=None``, or for ``lr="auto"`` the base LR a
    short study chose (:func:`autobatch.tune.auto_lr.choose_base_lr`; a resumed run reads the
    study it already ran from its checkpoint instead of running a second one).

    Raises:
        ValueError: for a string other than ``"auto"``, or ``lr="auto"`` with a
            ``forward_loss`` (the study trains through ``loss_fn``).
    """
    if not isinstance(lr, str):
        return lr, None
    if lr != "auto":
        raise ValueError(f"lr must be a number > 0 or 'auto' (got lr={lr!r}); e.g. lr=0.1, or lr='auto' to "
                         "choose it with a short study first")
    if fit_args.pop("forward_loss", None) is not None or fit_args.get("loss_fn") is None:
        raise ValueError("lr='auto' trains its trials through loss_fn(model(input), target): pass loss_fn (it "
                         "does not support forward_loss or a model's own .loss yet), or pass a number as lr")
    from autobatch.tune.auto_lr import choose_base_lr, resumed_search  # imports optuna

    search = resumed_search(checkpoint_dir) if resume else None
    if search is None:
        search = choose_base_lr(model, data, config=FitConfig.from_any(config, **config_overrides), **fit_args)
    return search.lr, search


def budget_total(epochs: float | None, max_steps: int | None, max_samples: int | None, n: int) -> float | None:
    """The size of the budget that binds (see :func:`~autobatch.policies.budget.budget_kind`):
    ``max_steps`` in optimizer steps when it alone is given, else the examples allowed, the
    smaller of ``epochs x n`` and ``max_samples`` (``n``: examples in the training set); None
    when no limit is given."""
    if budget_kind(epochs, max_steps, max_samples) == "steps":
        return float(max_steps)  # type: ignore[arg-type]
    total = total_samples(epochs, max_samples, n)
    return None if total is None else float(total)


def build_controller(cfg: FitConfig, *, optimizer: Any, method: str, base_batch_size: int, max_batch_size: int,
                     micro_batch_size: int | None, min_micro_batches: int,
                     epochs: float | None = None, max_steps: int | None = None,
                     max_samples: int | None = None, num_examples: int = 0,
                     lr_scheduled: bool = False) -> BatchSizeController:
    """The batch-size controller for ``cfg`` (``fit``'s, and the trainer integrations'), with
    the caller's sizes.

    Args:
        cfg: the settings (policy, LR rule, estimator, bounds).
        optimizer: the optimizer (or its family's name, e.g. ``"sgd"``) whose family picks the
            default LR rule.
        method: the noise-scale method in use (``"micro"``, ``"per_example"`` or ``"off"``).
        base_batch_size: B0, global examples per optimizer step at the start.
        max_batch_size: the largest global B allowed (already clipped to the data set).
        micro_batch_size: the micro-batch cap (per process), or None for none.
        min_micro_batches: micro-batches per step and process when B allows.
        epochs, max_steps, max_samples: the run's length (None: not set), from which the
            policy learns what limits the run (:func:`~autobatch.policies.budget.budget_kind`)
            and how far through it the run is (:func:`budget_total`).
        num_examples: examples in the training set (for an epoch budget).
        lr_scheduled: whether a user's LR scheduler shapes the base LR.

    Raises:
        ValueError: for a policy or LR rule that needs the noise scale while ``method="off"``.
    """
    scaling_name = cfg.lr.lr_scaling or default_scaling(optimizer)
    if method == "off" and (cfg.batch.policy in ("budget", "gns", "goodput") or scaling_name == "adascale"):
        raise ValueError(
            f"gns_method='off' leaves policy={cfg.batch.policy!r} / lr_scaling={scaling_name!r} "
            "without the noise scale they need; use policy 'fixed' or 'ramp' with lr_scaling "
            "'linear', 'sqrt' or 'none', or measure with gns_method='micro'"
        )
    return BatchSizeController(
        policy=make_policy(cfg.batch.policy, cfg.batch, cfg.lr),
        scaling=make_scaling(scaling_name),
        estimator=GradientNoiseScale(cfg.estimator.gns_smoothing, min_updates=cfg.estimator.gns_min_updates),
        base_batch_size=base_batch_size,
        min_batch_size=min(cfg.batch.min_batch_size or base_batch_size, base_batch_size),
        max_batch_size=max_batch_size,
        decide_every=cfg.batch.decide_every,
        max_micro_batch_size=micro_batch_size,
        min_micro_batches=min_micro_batches,
        max_lr_factor=cfg.lr.max_lr_factor,
        warmup_steps=cfg.lr.warmup_steps,
        budget=budget_kind(epochs, max_steps, max_samples),
        budget_total=budget_total(epochs, max_steps, max_samples, num_examples),
        lr_scheduled=lr_scheduled,
    )
