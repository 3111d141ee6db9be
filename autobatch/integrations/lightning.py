"""``AdaptiveBatchSize``: autobatch as a PyTorch Lightning callback.

Add it to an existing Trainer; the LightningModule and the DataLoader stay as they are::

    trainer = L.Trainer(max_epochs=5, callbacks=[AdaptiveBatchSize(max_batch_size=4096)])
    trainer.fit(model, DataLoader(train_set, batch_size=64, shuffle=True))

How it works (an optimizer step holds one global batch of B examples):

- **Micro-batch**: the DataLoader's ``batch_size`` ``m`` (per process), which is known to fit in
  memory. B is always a whole number of micro-batches on every process, ``B = k x W x m`` for
  ``W`` processes: the policy's proposals are rounded to multiples of ``W x m``. B grows
  through ``k``, the number of accumulated micro-batches.
- **Order**: the DataLoader's sampler is replaced by a seeded, resumable one drawing each
  epoch's permutation from :class:`~autobatch.train.sampler.SampleStream` (the order
  :func:`autobatch.fit` uses). Under DDP the epoch is padded like ``DistributedSampler`` and
  each rank takes its contiguous m-slice of every ``W x m`` chunk, so all ranks hold micro-batches
  of the same size. The DataLoader's length, and so Lightning's epochs, do not change.
- **Accumulation**: Lightning zeroes gradients where ``batch_idx % accumulate_grad_batches == 0``
  and steps where ``(batch_idx + 1) % accumulate_grad_batches == 0``; before each micro-batch
  the callback sets ``trainer.accumulate_grad_batches`` to a value for which both fall on the
  step's first and last micro-batch (:func:`accumulation_setting`). Lightning divides each loss
  by that value; where it is not the micro-batch's share ``b_i / B_local``, a hook on the loss
  corrects the gradient, so ``.grad`` is exactly the mean gradient over the B examples.
- **Noise scale**: :class:`~autobatch.noise.micro_batch.MicroBatchNormCollector` hooks see each
  micro-batch's gradient (before DDP's all-reduce); the step's gradient is read in
  ``on_before_optimizer_step``: after the all-reduce and AMP unscaling, before clipping.
- **LR**: the batch-size factor multiplies each param group's LR only while
  ``optimizer.step()`` runs (:class:`~autobatch.integrations._common.LRFactor`); schedulers from
  ``configure_optimizers`` keep stepping their own values (one scheduler step per optimizer step).
- **Decisions**: every ``decide_every`` steps; rank 0's decision is broadcast to every rank.

Supported: automatic optimization with one optimizer, one train DataLoader built with
``batch_size`` (a RandomSampler or SequentialSampler, or Lightning's DistributedSampler),
full epochs (``limit_train_batches=1.0``), precision 32/16-mixed/bf16-mixed, single device and DDP.
Checkpoints written at a step boundary (``ModelCheckpoint`` always writes there) resume exactly.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from autobatch.config import FitConfig
from autobatch.data import batch_size_of
from autobatch.integrations._common import (
    LRFactor,
    explicit_settings,
    round_to_multiple,
    trainer_controller,
)
from autobatch.loggers.base import probe_metrics, step_metrics
from autobatch.memory.probe import probe_memory
from autobatch.noise.micro_batch import (
    MicroBatchNormCollector,
    grad_sq_norm,
    trainable_parameters,
)
from autobatch.train.distributed import DistInfo, broadcast_int
from autobatch.train.results import StepRecord
from autobatch.train.sampler import SampleStream
from autobatch.train.step_norms import norms_from_totals

__all__ = ["AdaptiveBatchSize", "accumulation_setting"]


def accumulation_setting(batch_idx: int, position: int, num_micro: int) -> tuple[int, bool]:
    """The ``accumulate_grad_batches`` value under which Lightning treats micro-batch
    ``position`` of a ``num_micro``-micro-batch step, at ``batch_idx`` in the epoch, right.

    Lightning zeroes the gradients (after the forward) where ``batch_idx % a == 0`` and steps
    the optimizer where ``(batch_idx + 1) % a == 0``. The step's first micro-batch needs the
    first and only it, the last needs the second and only it.

    Returns:
        ``(a, zero_yourself)``: ``zero_yourself`` is True in the one case no ``a`` can express
        (a first, not last, micro-batch at ``batch_idx == 1``): then ``a`` avoids both and the
        caller zeroes the gradients itself before the micro-batch.
    """
    i, first, last = batch_idx, position == 0, position == num_micro - 1
    if first and last:
        return 1, False
    if first:
        if i % num_micro == 0:  # aligned: Lightning's own normalisation is already b_i / B
            return num_micro, False
        return (i, False) if i >= 2 else (3, True)
    if last:
        return ((num_micro, False) if (i + 1) % num_micro == 0 and i % num_micro else (i + 1, False))
    if i % num_micro and (i + 1) % num_micro:
        return num_micro, False
    return i + 2, False


class _StreamSampler(Sampler[int]):
    """This rank's indices of the current epoch, from the callback's position on.

    The epoch's order is ``SampleStream``'s permutation of ``(seed, epoch)``, padded to a
    multiple of ``world_size`` by repeating its start (as ``DistributedSampler`` does). It is
    cut into chunks of ``world_size x micro`` (the last one shorter, still a multiple of
    ``world_size``); rank ``r`` takes the ``r``-th equal slice of each chunk, so the
    DataLoader's BatchSampler (batch size ``micro``) turns each chunk into one micro-batch
    per rank. Its length is the padded epoch over ``world_size``, like ``DistributedSampler``'s.
    """

    def __init__(self, owner: AdaptiveBatchSize, n: int, micro: int, world_size: int, rank: int,
                 shuffle: bool, seed: int) -> None:
        self.owner, self.n, self.micro, self.world_size, self.rank = owner, n, micro, world_size, rank
        self.stream = SampleStream(n, shuffle=shuffle, seed=seed)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        self.stream.epoch, self.stream.position = epoch, 0
        order = self.stream.take(self.n)
        pad = len(self) * self.world_size - self.n
        return torch.cat([order, order[:pad]])

    def __iter__(self):
        epoch, start = self.owner._cursor  # read when the iteration really starts
        order = self.epoch_order(epoch)
        per_rank, w = len(self), self.world_size
        for chunk in range(start, math.ceil(per_rank / self.micro)):
            local = min(self.micro, per_rank - chunk * self.micro)
            first = chunk * self.micro * w + self.rank * local
            yield from order[first : first + local].tolist()


class AdaptiveBatchSize(pl.Callback):
    """Adaptive global batch size for an unchanged LightningModule and DataLoader.

    Args:
        config: a :class:`~autobatch.config.FitConfig`, a dict or None; the same settings as
            :func:`autobatch.fit` (policy, LR rule, estimator, bounds, seed, shuffle). Batch
            sizes are global examples per optimizer step. ``initial_batch_size`` defaults to
            the Trainer's current global batch, ``W x m x accumulate_grad_batches``, and on one
            process to at least ``2 x m`` (two micro-batches per step give the noise estimate);
            ``round_to`` defaults to ``W x m``. The fit-loop settings ``num_workers``,
            ``eval_every``, ``checkpoint_every``, ``progress``, ``loggers`` and ``log_dir`` are
            the Trainer's. ``probe_memory=True`` (off by default) runs the memory probe on the
            module's ``training_step`` and optimizer when training starts and grows the
            DataLoader's batch (the micro-batch) to the largest that fits and that B0 splits
            into (on one process at most B0 / 2), never below the DataLoader's own
            (``memory_budget``, ``memory_margin`` as in ``fit``; the answer in ``probe``).
        **overrides: flat settings on top of ``config``, e.g. ``max_batch_size=4096``.

    Attributes:
        history: one :class:`~autobatch.train.results.StepRecord` per optimizer step, the rows
            of ``FitResult.history``; restored from checkpoints.
        controller: the :class:`~autobatch.train.controller.BatchSizeController` (set when
            training starts).
        probe: the memory probe's :class:`~autobatch.memory.probe.MemoryProbeResult` with
            ``probe_memory=True``, else None.

    The callback sends fit's names (:mod:`autobatch.loggers.base`: ``train/batch_size``,
    ``train/micro_batch_size``, ``train/lr``, ``train/loss``, ``train/examples``, ``train/epoch``,
    ``gns/*`` once known) and ``train/lr_factor`` to the Trainer's loggers every
    ``log_every_n_steps`` optimizer steps (at ``trainer.global_step``), and ``probe/*`` once.
    """

    def __init__(self, config: FitConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        self.config = FitConfig.from_any(config, **overrides)
        self._explicit = explicit_settings(config, overrides)
        self.history: list[StepRecord] = []
        self.controller = None
        self._loaded: dict[str, Any] | None = None
        self._cursor = (0, 0)  # (epoch, micro-batch index in the epoch) of the next micro-batch
        self._plan: dict[str, Any] | None = None
        self._steps = self._samples = 0
        self._elapsed = 0.0
        self.probe = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AdaptiveBatchSize drives Lightning's gradient accumulation, which only automatic "
                "optimization has (got automatic_optimization=False); use autobatch's custom-loop "
                "kit (examples/custom_loop.py) in a manual training_step"
            )
        strategy = type(trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
            raise ValueError(
                f"AdaptiveBatchSize drives accumulation through Lightning's per-batch gradient sync, which the "
                f"{strategy} does not expose to it (got strategy={strategy}); it supports one device and DDP. For "
                "a sharded model, shard it with torch.distributed.fsdp.fully_shard and train it with autobatch.fit, "
                "which measures the noise scale under FSDP2 and HSDP"
            )
        if any(type(cb).__name__ == "GradientAccumulationScheduler" for cb in trainer.callbacks):
            raise ValueError(
                "AdaptiveBatchSize sets the accumulation itself; remove GradientAccumulationScheduler "
                "(and pass accumulate_grad_batches as an int)"
            )
        if trainer.reload_dataloaders_every_n_epochs:
            raise ValueError(
                "AdaptiveBatchSize installs its sampler in the train DataLoader once; a reloaded "
                f"DataLoader would lose it (got reload_dataloaders_every_n_epochs="
                f"{trainer.reload_dataloaders_every_n_epochs}); set it to 0"
            )
        if trainer.limit_train_batches != 1.0 or trainer.overfit_batches:
            raise ValueError(
                "AdaptiveBatchSize needs whole epochs (got limit_train_batches="
                f"{trainer.limit_train_batches}, overfit_batches={trainer.overfit_batches}); "
                "stop early with max_steps instead"
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(loader, DataLoader) or not isinstance(sampler, BatchSampler):
            raise TypeError(
                "AdaptiveBatchSize needs one train DataLoader built with batch_size= (got "
                f"{type(loader).__name__}{' with a custom batch_sampler' if isinstance(loader, DataLoader) else ''});"
                " its batch size becomes the micro-batch"
            )
        m, w, n = sampler.batch_size, trainer.world_size, len(loader.dataset)
        unit = w * m
        if n < w:
            raise ValueError(f"the training set has {n} examples, fewer than world_size={w}")
        cfg = self.config
        if "initial_batch_size" in self._explicit:
            b0 = cfg.batch.initial_batch_size
        else:
            b0 = unit * max(int(trainer.accumulate_grad_batches), 1 if w > 1 else 2)
        if b0 % unit or (w == 1 and b0 < 2 * m):
            raise ValueError(
                f"initial_batch_size={b0} must be a multiple of world_size x micro-batch = {w} x {m} "
                f"= {unit}{' and at least 2 micro-batches' if w == 1 else ''}; the DataLoader's "
                "batch_size is the micro-batch, so change one of the two"
            )
        if cfg.memory.probe_memory:
            m = self._grow_micro_batch(trainer, pl_module, loader, b0, m)
            unit = w * m
        round_to = cfg.batch.round_to if "round_to" in self._explicit else unit
        if round_to % unit:
            raise ValueError(f"round_to={round_to} must be a multiple of world_size x micro-batch = {unit}")
        self._cfg = FitConfig.from_any(cfg, initial_batch_size=b0, round_to=round_to)
        padded = w * len(_StreamSampler(self, n, m, w, 0, False, 0))
        if b0 > padded:
            raise ValueError(f"initial_batch_size={b0} is larger than the training set ({n} examples)")
        max_b = max(b0, min(cfg.batch.max_batch_size or padded, padded) // unit * unit)
        self.controller = trainer_controller(
            self._cfg, optimizer=trainer.optimizers[0], base_batch_size=b0, max_batch_size=max_b,
            micro_batch_size=m, min_micro_batches=1 if w > 1 else 2,
            epochs=trainer.max_epochs, max_steps=trainer.max_steps, num_examples=n,
            lr_scheduled=bool(trainer.lr_scheduler_configs),
        )
        self._unit, self._world, self._micro, self._n = unit, w, m, n
        self._info = DistInfo(trainer.global_rank, w)
        self._device = pl_module.device
        per_rank = math.ceil(n / w)
        sizes = [m] * (per_rank // m) + ([per_rank % m] if per_rank % m else [])
        self._epoch_sizes = sizes[: len(sizes) - 1] if sampler.drop_last and per_rank % m else sizes
        self._restore()
        sampler.sampler = _StreamSampler(self, n, m, w, trainer.global_rank,
                                         _shuffles(sampler.sampler), self._cfg.data.seed)
        if loader.num_workers > 0:
            # Worker processes already drew indices from the old sampler when Lightning built
            # the epoch's iterator; rebuild it (Lightning's own tuner resets loaders the same way).
            fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)
        self._user_accumulate = trainer.accumulate_grad_batches
        self._params = trainable_parameters(pl_module)
        self._collector = (MicroBatchNormCollector(pl_module) if self._cfg.estimator.gns_method != "off" else None)
        self._lr = LRFactor(trainer.optimizers)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._start = time.perf_counter() - self._elapsed

    def _grow_micro_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: DataLoader, b0: int,
                          m: int) -> int:
        """``probe_memory=True``: the largest micro-batch the memory probe lets a step hold, on
        the module's ``training_step`` and optimizer, at the Trainer's precision, rounded down to
        one B0 splits into (one process: at least two per step), never below the DataLoader's
        own; the DataLoader's batch sampler and Lightning's count of batches take it."""
        w = trainer.world_size
        local = b0 // w
        most = local // 2 if w == 1 else local
        probe = probe_memory(
            pl_module, loader, None, optimizer=trainer.optimizers[0], forward_loss=_training_step_loss,
            device=pl_module.device, budget_bytes=self.config.memory.memory_budget, max_micro_batch_size=max(most, m),
            margin=self.config.memory.memory_margin, precision=_PRECISIONS.get(str(trainer.precision), "fp32"))
        found = broadcast_int(probe.max_micro_batch_size, DistInfo(trainer.global_rank, w), pl_module.device)
        step = self.config.batch.round_to // w if "round_to" in self._explicit else None
        grown = max((d for d in range(m, min(found, most) + 1)
                     if local % d == 0 and (step is None or step % d == 0)), default=m)
        self.probe = probe
        if trainer.loggers and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(probe_metrics(probe), step=0)
        if grown != m:
            loader.batch_sampler.batch_size = grown
            _recount_batches(trainer, loader)
        return grown

    def _restore(self) -> None:
        state, self._loaded = self._loaded, None
        if state is None:
            return
        expected = {"num_examples": self._n, "world_size": self._world, "micro_batch_size": self._micro}
        if state["layout"] != expected:
            raise ValueError(
                f"the checkpoint was written for {state['layout']}, this run has {expected}; "
                "resume with the same data, DataLoader batch_size and number of processes"
            )
        self.controller.load_state_dict(state["controller"])
        self._cursor = tuple(state["cursor"])
        self._steps, self._samples, self._elapsed = state["steps"], state["samples"], state["wall_time_s"]
        self.history = [StepRecord(**row) for row in state["history"]]

    # -- one micro-batch ---------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._plan is None:
            self._begin_step(trainer, batch_idx)
        plan = self._plan
        j, sizes = plan["position"], plan["sizes"]
        if batch_size_of(batch) != sizes[j]:
            raise RuntimeError(
                f"micro-batch {batch_idx} holds {batch_size_of(batch)} examples where AdaptiveBatchSize "
                f"planned {sizes[j]}; something else changed the DataLoader's sampler or batch size"
            )
        accumulate, zero_yourself = accumulation_setting(batch_idx, j, len(sizes))
        if zero_yourself:
            for opt in trainer.optimizers:
                opt.zero_grad(set_to_none=True)
        trainer.accumulate_grad_batches = accumulate
        plan["weight"] = sizes[j] / plan["local"]  # b_i / B_local: DDP's mean over ranks does the rest
        plan["accumulate"] = accumulate

    def _begin_step(self, trainer: pl.Trainer, batch_idx: int) -> None:
        epoch, micro = self._cursor
        if (epoch, micro) != (trainer.current_epoch, batch_idx):
            raise RuntimeError(
                f"AdaptiveBatchSize expected epoch {epoch}, micro-batch {micro} but Lightning is at "
                f"epoch {trainer.current_epoch}, batch {batch_idx}; a checkpoint written in the middle "
                "of an accumulated step cannot be resumed exactly (ModelCheckpoint writes at step ends)"
            )
        controller = self.controller
        sizes = self._epoch_sizes[micro : micro + controller.batch_size // self._unit]
        self._lr.factor = controller.lr_factor(self._steps + 1)  # rule x cap x policy x warm-up
        if self._collector is not None:
            self._collector.begin_step()
        self._plan = {"sizes": sizes, "local": sum(sizes), "position": 0, "t0": time.perf_counter(),
                      "losses": [], "loss_factors": []}

    def _grad_scale(self) -> float:
        return float(self._scaler.get_scale()) if self._scaler is not None and self._scaler.is_enabled() else 1.0

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        plan = self._plan
        if plan is None:
            return
        b, accumulate = plan["sizes"][plan["position"]], plan["accumulate"]
        # Lightning passed loss_i / accumulate (times the AMP scale); undone for the record at
        # the step's end, in one operation for all micro-batches.
        plan["losses"].append(loss.detach())
        plan["loss_factors"].append(accumulate * b / self._grad_scale())
        correction = plan["weight"] * accumulate
        if abs(correction - 1.0) > 1e-12:
            loss.register_hook(lambda grad: grad * correction)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = self._plan
        if plan is not None and self._collector is not None:
            self._collector.after_backward(batch_size=plan["sizes"][plan["position"]], loss_weight=plan["weight"])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        plan = self._plan
        if plan is None:
            return
        scale = self._grad_scale()
        local = (self._collector.end_step(grad_scale=scale, min_micro_batches=1, big_norm=False)
                 if self._collector is not None else None)
        big = grad_sq_norm(self._params).to(self._device) if self._collector is not None else torch.zeros((), device=self._device)
        losses = torch.stack(plan["losses"]).float() if plan["losses"] else torch.zeros(0, device=self._device)
        loss_sum = (losses * torch.tensor(plan["loss_factors"], device=losses.device)).sum()
        # One host sync per step: the step's gradient norm (all-reduced, unscaled) and loss.
        big_sq, loss_sum = torch.stack([big.float(), loss_sum]).tolist()
        total = plan["local"] * self._world
        # every rank's micro-batches are small batches of the step: sum their totals over ranks
        smalls = local.small_sq_norms if local is not None else []
        sizes = local.micro_batch_sizes if local is not None else []
        totals = [sum(smalls), float(len(smalls)), sum(1.0 / b for b in sizes), float(loss_sum)]
        if self._info.enabled:
            reduced = torch.tensor(totals, device=self._device, dtype=torch.float64)
            torch.distributed.all_reduce(reduced)
            totals = reduced.tolist()
        norms = norms_from_totals(totals[0], totals[1], totals[2], big_sq, total)
        loss_total = totals[3]
        plan["norms"], plan["loss"] = norms, loss_total / total

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        plan = self._plan
        if plan is None:
            return
        plan["position"] += 1
        epoch, micro = self._cursor
        micro += 1
        self._cursor = (epoch + 1, 0) if micro == len(self._epoch_sizes) else (epoch, micro)
        if plan["position"] < len(plan["sizes"]):
            return
        self._plan = None
        self._end_step(pl_module, plan)

    def _end_step(self, pl_module: pl.LightningModule, plan: dict[str, Any]) -> None:
        controller, total = self.controller, plan["local"] * self._world
        self._steps += 1
        self._samples += total
        epoch, micro = self._cursor
        epochs_done = epoch + sum(self._epoch_sizes[:micro]) / sum(self._epoch_sizes)
        norms, loss = plan.get("norms"), plan.get("loss", math.nan)
        finite = math.isfinite(loss) and (norms is None or math.isfinite(norms.big_sq_norm))
        controller.observe(step=self._steps, epoch=epochs_done, samples=self._samples, batch_size=total,
                           step_time_s=time.perf_counter() - plan["t0"], norms=norms if finite else None,
                           loss=loss if finite else None)  # the step's mean over all ranks, for the guard
        est = controller.estimator
        record = StepRecord(
            step=self._steps, epoch=epochs_done, samples=self._samples, batch_size=controller.batch_size,
            examples=total, micro_batch_size=max(plan["sizes"]), accum_steps=len(plan["sizes"]),
            lr=self._lr.last_lrs[0], base_lr=self._lr.last_base_lrs[0], train_loss=loss, grad_sq=est.grad_sq,
            trace_cov=est.trace_cov, noise_scale=est.noise_scale if est.ready else math.nan,
            noise_scale_stderr=est.noise_scale_stderr, wall_time_s=time.perf_counter() - self._start,
            skipped=not finite, loss_items=self._samples,
        )
        self.history.append(record)
        # whole micro-batches on every rank, and rank 0's decision for all (step times differ)
        controller.maybe_decide(agree=lambda b: broadcast_int(
            round_to_multiple(b, self._unit, controller.min_batch_size, controller.max_batch_size),
            self._info, self._device))
        trainer = pl_module.trainer
        if trainer.loggers and self._steps % trainer.log_every_n_steps == 0:
            # Straight to the loggers, as LearningRateMonitor does: LightningModule.log costs
            # milliseconds per call, a tenth of a small model's step. fit's names; what is not
            # known yet (NaN: the noise scale before its estimate) is left out.
            metrics = {k: float(v) for k, v in step_metrics(record).items() if math.isfinite(v)}
            metrics["train/lr_factor"] = float(self._lr.factor)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # -- teardown and checkpoints ------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._teardown(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._teardown(trainer)

    def _teardown(self, trainer: pl.Trainer) -> None:
        if getattr(self, "_collector", None) is not None:
            self._collector.remove()
            self._collector = None
        if getattr(self, "_lr", None) is not None:
            self._lr.remove()
            self._lr = None
            trainer.accumulate_grad_batches = self._user_accumulate
        self._elapsed = time.perf_counter() - self._start if hasattr(self, "_start") else self._elapsed

    def state_dict(self) -> dict[str, Any]:
        """Controller, data position, counters and history; written into Lightning checkpoints."""
        if self.controller is None:
            return dict(self._loaded or {})
        if self._plan is not None:
            warnings.warn("AdaptiveBatchSize state saved in the middle of an accumulated step; resuming "
                          "from this checkpoint will fail (save at step ends, as ModelCheckpoint does)",
                          stacklevel=2)
        return {
            "controller": self.controller.state_dict(),
            "cursor": list(self._cursor),
            "steps": self._steps,
            "samples": self._samples,
            "wall_time_s": time.perf_counter() - self._start if hasattr(self, "_start") else self._elapsed,
            "history": [rec.model_dump() for rec in self.history],
            "layout": {"num_examples": self._n, "world_size": self._world, "micro_batch_size": self._micro},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state; it is applied when training starts."""
        self._loaded = dict(state_dict) if state_dict else None


def _shuffles(sampler: Any) -> bool:
    if isinstance(sampler, RandomSampler):
        return True
    if isinstance(sampler, SequentialSampler):
        return False
    if isinstance(sampler, DistributedSampler):
        return bool(sampler.shuffle)
    raise ValueError(
        f"AdaptiveBatchSize replaces the DataLoader's sampler with a seeded, resumable one; a "
        f"{type(sampler).__name__} cannot be carried over. Use shuffle=True or False (seed= sets the "
        "order), or write the loop yourself with the custom-loop kit"
    )


_PRECISIONS = {"16-mixed": "fp16", "bf16-mixed": "bf16", "bf16-true": "bf16", "16-true": "fp16"}


def _training_step_loss(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The loss of the module's own ``training_step``, for the memory probe: its ``self.log``
    calls are silenced (the probe's steps run on fake tensors that no logger may keep)."""
    silenced = {"log": lambda *args, **kwargs: None, "log_dict": lambda *args, **kwargs: None}
    module.__dict__.update(silenced)
    try:
        out = module.training_step(batch, 0)
    finally:
        for name in silenced:
            module.__dict__.pop(name, None)
    return out["loss"] if isinstance(out, dict) else out


def _recount_batches(trainer: pl.Trainer, loader: DataLoader) -> None:
    """Tell Lightning's fit loop the train DataLoader's new length (its batch size changed
    after the loop counted it): the loader's limit, its iterator, the epoch's batches and the
    validation interval derived from them (as ``_FitLoop.setup_data`` computes them)."""
    loop = trainer.fit_loop
    combined = getattr(loop, "_combined_loader", None)
    if combined is not None:
        combined.limits = [len(loader)]
    fetcher = getattr(loop, "_data_fetcher", None)
    if fetcher is not None:
        iter(fetcher)
    loop.max_batches = len(loader)
    if isinstance(trainer.val_check_interval, float) and trainer.val_check_batch is not None:
        trainer.val_check_batch = max(1, int(len(loader) * trainer.val_check_interval))
