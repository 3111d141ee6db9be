"""``AdaptiveBatchTrainer``: a drop-in subclass of the Hugging Face ``transformers.Trainer``.

Swap the class; the constructor, the TrainingArguments, datasets, collator, callbacks and
``hyperparameter_search`` stay as they are::

    trainer = AdaptiveBatchTrainer(model=model, args=TrainingArguments(..., per_device_train_batch_size=16),
                                   train_dataset=train, data_collator=collate,
                                   autobatch_config={"max_batch_size": 1024})
    trainer.train()

How it works (an optimizer step holds one global batch of B examples):

- **Batches**: ``per_device_train_batch_size x gradient_accumulation_steps`` becomes B0; the
  micro-batch is at most ``per_device_train_batch_size`` (the size known to fit;
  ``max_micro_batch_size`` in the config overrides it) and a step has at least two, which give
  the noise estimate. To the Trainer's loop each optimizer step is one "batch" (its gradient
  accumulation is 1): the train loader yields a :class:`StepBatch` per step, the step's next B
  indices of the epoch's :class:`~autobatch.train.sampler.SampleStream` order, each micro-batch
  collated (padded) by the data collator on its own.
- **Loss normalisation**: :meth:`AdaptiveBatchTrainer.training_step` runs the micro-batches.
  When the model (or ``compute_loss_func``) takes ``num_items_in_batch``, every micro-batch gets
  the step's count of loss tokens (the Trainer's own count: shifted labels != -100 for causal
  LMs), so each loss is a sum over its tokens divided by the step's total and the accumulated
  gradient is the token mean over the whole step. Otherwise each mean loss is weighted by its
  share of the step's examples.
- **Noise scale**: micro-batch norms from the backward passes (before clipping, AMP scale
  divided out). With token-normalised losses the small batches are measured in tokens and
  reported in examples (tokens / mean tokens per example of the step), the unit of B.
- **LR**: the batch-size factor multiplies the scheduled LR only while ``optimizer.step()``
  runs; the scheduler keeps its own values. In an epoch-based run the schedule is laid out
  in steps of the smallest allowed batch (``len(train_dataloader)`` steps per epoch), and its
  clock advances by ``B / B_min`` steps per optimizer step (one per ``B_min`` examples), so
  warm-up and decay end where the epochs do whatever B becomes. With ``max_steps`` the
  schedule counts optimizer steps, as the run does.
- **State**: the controller, the data position and the history go into ``trainer_state.json``
  (``stateful_callbacks["AdaptiveBatchTrainer"]``); ``resume_from_checkpoint`` continues with the
  same B and order. Every training log (``state.log_history``, ``report_to``'s writers) carries
  fit's names (``batch_size``, ``micro_batch_size``, ``lr``, ``examples``, ``tokens``,
  ``gns/noise_scale``, ...; TensorBoard and W&B put ``train/`` in front) with ``noise_scale`` and
  ``lr_factor``; ``state.epoch`` counts examples seen.

- **Several processes** (``torchrun``, ``accelerate launch``; the Trainer's DDP): every process
  takes the step's global indices and keeps its contiguous share; only its last micro-batch
  syncs gradients (DDP ``no_sync`` before); each loss is weighted by its share of the global
  step's loss items (summed over processes) times their number, since DDP averages; the
  micro-batch norms and the loss are summed over processes in one all-reduce; rank 0's
  decision is broadcast. The Trainer's FSDP and DeepSpeed engines fix gradient accumulation
  at the start and are refused (shard with ``fully_shard`` and use :func:`autobatch.fit`).

Memory: ``probe_memory=True`` (off by default) sets the micro-batch cap to the memory probe's
answer when training starts; an out-of-memory micro-batch halves the micro-batch and the step
is redone. Collation runs in
the main process (``dataloader_num_workers`` is not used for training); the Trainer's
sampler options (``group_by_length``, ``dataloader_drop_last``) do not apply.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import transformers
from transformers import TrainerCallback

from autobatch.accumulate import accumulate_gradients, count_step_items
from autobatch.config import FitConfig
from autobatch.integrations._common import LRFactor, explicit_settings, trainer_controller, unwrap_optimizer
from autobatch.loggers.base import probe_metrics, step_metrics
from autobatch.memory.oom import release_after_oom, retry_after_oom
from autobatch.memory.probe import probe_memory
from autobatch.noise.micro_batch import MicroBatchNormCollector, StepGradNorms, grad_sq_norm
from autobatch.train.data_loader import take_step
from autobatch.train.distributed import DistInfo, agree_max, broadcast_int, local_share, sum_int
from autobatch.train.results import StepRecord
from autobatch.train.sampler import SampleStream
from autobatch.train.step_norms import norms_from_totals

__all__ = ["AdaptiveBatchTrainer", "StepBatch"]

# TrainingArguments.lr_scheduler_type values that keep the LR constant after any warm-up
_CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")

_STATE_KEY = "AdaptiveBatchTrainer"


class StepBatch:
    """One optimizer step's examples: dataset indices, their micro-batch split and the
    collated micro-batches (each padded on its own by the data collator).

    Attributes:
        indices: dataset indices of this process's share of the step, in order.
        sizes: examples per micro-batch (sum ``len(indices)``).
        micro_batches: the collated micro-batches.
        global_size: examples in the whole step, over every process (B).
    """

    def __init__(self, indices: list[int], sizes: list[int], fetch: Callable[[list[int]], Any],
                 global_size: int | None = None) -> None:
        self.indices, self._fetch = indices, fetch
        self.global_size = len(indices) if global_size is None else global_size
        self.split(sizes)

    def split(self, sizes: list[int]) -> None:
        """(Re)collate the micro-batches for a new split of the same examples."""
        if sum(sizes) != len(self.indices):
            raise ValueError(f"micro-batch sizes {sizes} do not add up to the step's {len(self.indices)} examples")
        self.sizes = list(sizes)
        bounds = [0, *itertools.accumulate(sizes)]
        self.micro_batches = [self._fetch(self.indices[a:b]) for a, b in itertools.pairwise(bounds)]

    def __len__(self) -> int:
        return len(self.indices)


class _StepLoader:
    """The train "dataloader" the Trainer's loop iterates: one :class:`StepBatch` per
    optimizer step, one stream epoch per iteration. Its length (steps per epoch at the
    smallest allowed batch) is an upper bound; the epoch simply ends earlier when B grew."""

    def __init__(self, trainer: AdaptiveBatchTrainer, dataset: Any, collate: Callable[[list[Any]], Any]) -> None:
        self.trainer, self.dataset, self.collate = trainer, dataset, collate

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.trainer.batch_controller.min_batch_size)

    def _fetch(self, indices: list[int]) -> Any:
        return self.collate([self.dataset[i] for i in indices])

    def __iter__(self) -> Iterator[StepBatch]:
        stream, controller, info = self.trainer._stream, self.trainer.batch_controller, self.trainer._info
        epoch = stream.epoch
        while stream.epoch == epoch:
            # B is read when the Trainer asks for the step: after the previous step's decision.
            # Every process takes the same global indices and keeps its contiguous share; an
            # epoch's tail smaller than the number of processes is carried into the next step.
            indices, _ = take_step(stream, controller.batch_size, info.world_size, "carry")
            local = local_share(indices, info).tolist()
            yield StepBatch(local, controller.micro_sizes(len(local)), self._fetch, global_size=len(indices))


class _Bookkeeping(TrainerCallback):
    """Installs the hooks when training starts, records each finished step, decides B."""

    def __init__(self, trainer: AdaptiveBatchTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin_training()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._end_training()


class AdaptiveBatchTrainer(transformers.Trainer):
    """``transformers.Trainer`` with a batch size chosen, and re-chosen, by autobatch.

    Takes every argument ``Trainer`` takes, plus:

    Args:
        autobatch_config: a :class:`~autobatch.config.FitConfig`, a dict or None: the settings
            of :func:`autobatch.fit` (policy, LR rule, estimator, bounds, seed). Batch sizes are
            global examples per optimizer step; ``initial_batch_size`` defaults to
            ``per_device_train_batch_size x gradient_accumulation_steps`` and
            ``max_micro_batch_size`` to ``per_device_train_batch_size``. ``seed`` defaults to
            ``TrainingArguments.seed``. ``probe_memory=True`` (off by default) replaces that cap
            with the memory probe's answer when training starts (on the model, the Trainer's
            optimizer and ``compute_loss``, the longest training example; ``memory_budget``,
            ``memory_margin`` as in ``fit``). ``loggers`` are the Trainer's (``report_to``).

    Attributes:
        batch_controller: the :class:`~autobatch.train.controller.BatchSizeController` of the
            current (or last) run.
        history: one :class:`~autobatch.train.results.StepRecord` per optimizer step.
        oom_retries: steps redone with a smaller micro-batch after running out of memory.
        probe: the memory probe's :class:`~autobatch.memory.probe.MemoryProbeResult` with
            ``probe_memory=True``, else None.
    """

    def __init__(self, *args: Any, autobatch_config: FitConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autobatch_config = FitConfig.from_any(autobatch_config)
        self._explicit = explicit_settings(autobatch_config, {})
        self.batch_controller = None
        self.history: list[StepRecord] = []
        self.oom_retries = 0
        self._saved_accumulation: int | None = None
        self._collector: MicroBatchNormCollector | None = None
        self._lr: LRFactor | None = None
        self._pending: dict[str, Any] = {}
        self._by_tokens = False
        self.probe = None
        self.add_callback(_Bookkeeping(self))

    # -- the run -----------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; the Trainer's own gradient accumulation is 1 while it runs (each
        of its "batches" is a whole step) and is put back afterwards."""
        self._saved_accumulation = self.args.gradient_accumulation_steps
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.gradient_accumulation_steps = self._saved_accumulation
            self._end_training()

    def get_train_dataloader(self) -> _StepLoader:
        """Start a run: build the controller and the sample stream, and return the step loader."""
        engine = ("FSDP" if getattr(self, "is_fsdp_enabled", False) else "DeepSpeed"
                  if getattr(self, "is_deepspeed_enabled", False) else None)
        if engine is not None:
            raise ValueError(
                f"AdaptiveBatchTrainer runs its own micro-batches per optimizer step, which the Trainer's {engine} "
                "engine does not let it do (it fixes gradient accumulation at the start); under torchrun it supports "
                "DDP (the Trainer's default for several processes). For a sharded model, shard it with "
                "torch.distributed.fsdp.fully_shard and train it with autobatch.fit"
            )
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collate = self.train_dataset, self.data_collator
        if transformers.utils.is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collate = self._get_collator_with_removed_columns(collate, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        micro = self._train_batch_size
        accumulation = self.args.gradient_accumulation_steps
        if self.is_in_train:  # train() puts the user's value back at the end
            self.args.gradient_accumulation_steps = 1  # the loop sees whole steps from here on
        cfg = self.autobatch_config
        defaults = {key: value for key, value in (("initial_batch_size", micro * accumulation),
                                                   ("max_micro_batch_size", micro),
                                                   ("seed", self.args.seed)) if key not in self._explicit}
        cfg = FitConfig.from_any(cfg, **defaults)
        n = len(dataset)
        b0 = cfg.batch.initial_batch_size
        if b0 > n:
            raise ValueError(f"initial_batch_size={b0} is larger than the training set ({n} examples)")
        # The optimizer is built later in the run; until then its family is TrainingArguments.optim.
        family = self.optimizer if self.optimizer is not None else str(getattr(self.args.optim, "value", self.args.optim))
        self.batch_controller = trainer_controller(
            cfg, optimizer=family,
            base_batch_size=b0, max_batch_size=min(cfg.batch.max_batch_size or n, n),
            # one process splits each step in two for the noise estimate; several processes hold a
            # share each, which is a small batch already
            micro_batch_size=cfg.memory.max_micro_batch_size, min_micro_batches=2 if self.args.world_size == 1 else 1,
            # as the Trainer reads them: max_steps > 0 overrides num_train_epochs
            epochs=None if self.args.max_steps > 0 else self.args.num_train_epochs,
            max_steps=self.args.max_steps, num_examples=n,
            # the Trainer's default schedule ("linear") decays the LR to 0; the constant ones do not
            lr_scheduled=self.lr_scheduler is not None or str(getattr(
                self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)) not in _CONSTANT_SCHEDULES,
        )
        self._cfg = cfg
        self._info = DistInfo(self.args.process_index, self.args.world_size)
        if b0 < self._info.world_size:
            raise ValueError(f"initial_batch_size={b0} is below the {self._info.world_size} processes: every process "
                             f"needs an example of each step; use initial_batch_size >= {self._info.world_size}")
        self._stream = SampleStream(n, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
        self._train_source = (dataset, collate)  # for the memory probe, when training starts
        self._steps = self._samples = 0
        self._samples_at_start = 0
        self._start = time.perf_counter()
        self.history, self.oom_retries = [], 0
        return _StepLoader(self, dataset, collate)

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device):
        """One :class:`StepBatch` per optimizer step; token counts are taken in
        :meth:`training_step`, per micro-batch."""
        if self.batch_controller is None:  # not our loader: plain Trainer behaviour
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        try:
            return [next(epoch_iterator)], None
        except StopIteration:
            return [], None

    def set_initial_training_values(self, args, dataloader):
        """The Trainer's plan, with enough epochs for ``max_steps`` however large B grows."""
        values = list(super().set_initial_training_values(args, dataloader))
        if args.max_steps > 0 and isinstance(dataloader, _StepLoader):
            values[0] = sys.maxsize  # the run stops at max_steps; epochs hold fewer steps as B grows
        return tuple(values)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        epochs_trained, skip = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        saved = self.state.stateful_callbacks.get(_STATE_KEY) if resume_from_checkpoint else None
        if saved and self.batch_controller is not None:
            self.batch_controller.load_state_dict(saved["controller"])
            self._stream.load_state_dict(saved["stream"])
            self._steps, self._samples = saved["steps"], saved["samples"]
            self.history = [StepRecord(**row) for row in saved["history"]]
            self.oom_retries = saved["oom_retries"]
            # The stream knows where the data stands; the Trainer must not skip batches itself.
            return self._stream.epoch, 0
        return epochs_trained, skip

    def _save_checkpoint(self, model, trial) -> None:
        if self.batch_controller is not None:
            self.state.stateful_callbacks[_STATE_KEY] = {
                "controller": self.batch_controller.state_dict(),
                "stream": self._stream.state_dict(),
                "steps": self._steps,
                "samples": self._samples,
                "oom_retries": self.oom_retries,
                "history": [rec.model_dump() for rec in self.history],
            }
        super()._save_checkpoint(model, trial)

    def _begin_training(self) -> None:
        if self.batch_controller is None:
            return
        self._samples_at_start = self._samples
        self._start = time.perf_counter() - (self.history[-1].wall_time_s if self.history else 0.0)
        if self._cfg.estimator.gns_method != "off":
            self._collector = MicroBatchNormCollector(self.model)
        self._lr = LRFactor([self.optimizer])
        if self._cfg.memory.probe_memory:
            self._probe_micro_batch()

    def _probe_micro_batch(self) -> None:
        """``probe_memory=True``: the micro-batch cap becomes the memory probe's answer, found on
        the model, the Trainer's optimizer and loss (``compute_loss``) and the longest training
        example collated, at the Trainer's precision; bounded by an explicit
        ``max_micro_batch_size``. Rank 0's answer is every process's."""
        dataset, collate = self._train_source
        cfg, controller = self._cfg, self.batch_controller
        explicit = cfg.memory.max_micro_batch_size if "max_micro_batch_size" in self._explicit else None
        probe = probe_memory(
            self.model, torch.utils.data.DataLoader(dataset, batch_size=1, collate_fn=collate), None,
            optimizer=unwrap_optimizer(self.optimizer), forward_loss=lambda model, batch: self.compute_loss(model, batch),
            device=self.args.device, budget_bytes=cfg.memory.memory_budget,
            max_micro_batch_size=explicit or controller.max_batch_size, margin=cfg.memory.memory_margin,
            precision="bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32")
        controller.max_micro_batch_size = broadcast_int(probe.max_micro_batch_size, self._info, self.args.device)
        self.probe = probe
        super().log(probe_metrics(probe))

    def _end_training(self) -> None:
        for name in ("_collector", "_lr"):
            hooks = getattr(self, name)
            if hooks is not None:
                hooks.remove()
                setattr(self, name, None)

    # -- one step ----------------------------------------------------------------------------
    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """Forward and backward over every micro-batch of a :class:`StepBatch`; returns the
        step's mean loss (token mean for token-normalised losses), detached.

        Anything else is handed to ``Trainer.training_step`` unchanged.
        """
        if not isinstance(inputs, StepBatch):
            return super().training_step(model, inputs, num_items_in_batch)
        controller = self.batch_controller
        if self._lr is not None:
            self._lr.factor = controller.lr_factor(self._steps + 1)  # rule x cap x policy x warm-up
        self._pending = {"t0": time.perf_counter()}
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()

        def on_oom(size: int) -> None:
            release_after_oom(model, None, self.args.device)
            controller.on_oom(size)
            inputs.split(controller.micro_sizes(len(inputs)))

        info = self._info
        loss, retries = retry_after_oom(
            lambda: self._accumulate(model, inputs), failed_size=lambda: max(inputs.sizes), on_oom=on_oom,
            # every process learns the largest failed micro-batch before any gradient collective
            agree=(lambda size: int(agree_max(size, info, self.args.device))) if info.enabled else None)
        self.oom_retries += retries
        return loss

    def _accumulate(self, model: torch.nn.Module, step: StepBatch) -> torch.Tensor:
        """This process's micro-batches of a step; under DDP only the last one syncs gradients,
        and each loss is weighted by its share of the *global* step (loss items summed over the
        processes) times their number, since DDP averages: the result is the step's mean-loss
        gradient, token-exact with uneven shares."""
        info, device = self._info, self.args.device
        world = info.world_size
        micro = [self._prepare_inputs(mb) for mb in step.micro_batches]
        first = micro[0]
        by_tokens = (self.model_accepts_loss_kwargs or self.compute_loss_func is not None) and isinstance(
            first, Mapping) and isinstance(first.get("shift_labels", first.get("labels")), torch.Tensor)
        if by_tokens:  # the Trainer's own count: (shifted) labels != -100, over every process
            counts, total = count_step_items(micro, "tokens", model=model, all_reduce_items=(
                lambda n: sum_int(n, info, device)) if info.enabled else None)
            num_items = torch.tensor(total, device=device)
        else:
            counts, total = list(step.sizes), step.global_size
        # compute_loss multiplies a loss given num_items_in_batch by the number of processes
        # itself when average_tokens_across_devices (the default) is on
        token_scale = 1.0 if self.args.average_tokens_across_devices else float(world)
        runnable = iter([i for i, c in enumerate(counts) if c > 0])
        last = max((i for i, c in enumerate(counts) if c > 0), default=-1)
        unsynced = contextlib.ExitStack()  # DDP's no_sync, from a micro-batch's forward to its backward

        def weighted_loss(batch: Any, weight: float) -> torch.Tensor:
            if info.enabled and next(runnable) != last:
                unsynced.enter_context(self.accelerator.no_sync(model))
            with self.compute_loss_context_manager():
                if by_tokens:  # loss = (sum over this micro-batch's tokens) / (the step's tokens)
                    loss = self.compute_loss(model, batch, num_items_in_batch=num_items) * token_scale
                else:  # a mean over the micro-batch, weighted by its share of the step
                    loss = self.compute_loss(model, batch) * (weight * world)
            return loss.mean() if self.args.n_gpu > 1 else loss

        def backward(loss: torch.Tensor) -> None:
            self.accelerator.backward(loss)
            unsynced.close()

        model.zero_grad(set_to_none=True)
        collector = self._collector
        if collector is not None:
            collector.begin_step()
        acc = accumulate_gradients(
            model, micro, counts=counts, total_items=total, weighted_loss=weighted_loss, backward=backward,
            after_backward=(lambda m: collector.after_backward(batch_size=m.items, loss_weight=m.weight * world))
            if collector is not None else None)
        local_loss = acc.loss.float() / world if acc.loss is not None else torch.zeros((), device=device)
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        local = (collector.end_step(grad_scale=scale, min_micro_batches=1, big_norm=False)
                 if collector is not None else None)
        smalls = local.small_sq_norms if local is not None else []
        sizes = local.micro_batch_sizes if local is not None else []
        # every process's micro-batches are small batches of the step: their totals summed over
        # processes, with the step's loss, in one all-reduce (one host sync)
        totals = [sum(smalls), float(len(smalls)), sum(1.0 / b for b in sizes)]
        if collector is not None:
            big = grad_sq_norm([p for p in model.parameters() if p.requires_grad]).to(device).float()
        else:
            big = torch.zeros((), device=device)
        summed = torch.stack([local_loss, big, *(torch.tensor(t, device=device, dtype=torch.float32) for t in totals)])
        if info.enabled:
            summed = summed.double()
            torch.distributed.all_reduce(summed)
        loss_total, big_sq, small_sum, count, inv = summed.tolist()
        big_sq /= world  # the reduced gradient is the same on every process
        norms = norms_from_totals(small_sum, count, inv, big_sq, step.global_size, scale) if collector else None
        if norms is None and collector is not None:
            norms = StepGradNorms([], math.nan, big_sq / (scale * scale), step.global_size, [])
        if norms is not None and by_tokens and norms.small_sq_norms:
            # Small and big batches were counted in tokens; B is counted in examples.
            per_token = step.global_size / total
            norms = StepGradNorms(norms.small_sq_norms, norms.small_batch_size * per_token, norms.big_sq_norm,
                                  step.global_size, step.sizes)
        self._pending.update(norms=norms, loss=loss_total, step=step, items=total)
        self._by_tokens = by_tokens
        return torch.tensor(loss_total, device=device)

    def _end_step(self, control) -> None:
        pending, self._pending = self._pending, {}
        if self.batch_controller is None or "step" not in pending:
            return
        controller, step = self.batch_controller, pending["step"]
        self._steps += 1
        self._samples += step.global_size
        loss = float(pending["loss"])
        norms = pending["norms"]
        finite = math.isfinite(loss) and (norms is None or math.isfinite(norms.big_sq_norm))
        stream = self._stream
        controller.observe(step=self._steps, epoch=stream.epochs_done, samples=self._samples, batch_size=step.global_size,
                           step_time_s=time.perf_counter() - pending["t0"], norms=norms if finite else None,
                           loss=loss if finite else None)  # for the default policy's stability guard
        est = controller.estimator
        self.history.append(StepRecord(
            step=self._steps, epoch=stream.epochs_done, samples=self._samples, batch_size=controller.batch_size,
            examples=step.global_size, micro_batch_size=max(step.sizes), accum_steps=len(step.sizes),
            lr=self._lr.last_lrs[0] if self._lr is not None else math.nan,
            base_lr=self._lr.last_base_lrs[0] if self._lr is not None else math.nan, train_loss=loss,
            grad_sq=est.grad_sq, trace_cov=est.trace_cov, noise_scale=est.noise_scale if est.ready else math.nan,
            noise_scale_stderr=est.noise_scale_stderr, wall_time_s=time.perf_counter() - self._start,
            skipped=not finite, loss_items=(self.history[-1].loss_items if self.history else 0) + int(pending["items"]),
        ))
        info = self._info  # rank 0 decides for every process (their step times differ)
        controller.maybe_decide(agree=(lambda b: broadcast_int(b, info, self.args.device)) if info.enabled else None)
        self.state.epoch = stream.epochs_done  # the Trainer's own figure counts steps at B_min
        if self.args.max_steps <= 0:
            self._advance_schedule(control)

    def _advance_schedule(self, control) -> None:
        """Epoch-based runs: the schedule's clock is examples / B_min (the unit its length was
        planned in); stop once it has run its course (fractional num_train_epochs)."""
        clock = self._samples // self.batch_controller.min_batch_size
        scheduler = self.lr_scheduler
        if scheduler is not None and hasattr(scheduler, "last_epoch"):
            while scheduler.last_epoch < min(clock, self.state.max_steps):
                scheduler.step()
        if clock >= self.state.max_steps:
            control.should_training_stop = True

    # -- figures -------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``; training logs also carry fit's names (:mod:`autobatch.loggers.base`)
        as ``report_to``'s writers expect them: without the ``train/`` that TensorBoard's and
        W&B's add to every training-time name (``batch_size``, ``micro_batch_size``, ``lr``,
        ``examples``, ``tokens`` for token-normalised losses), the estimator's under ``gns/``
        once known, and ``noise_scale`` and ``lr_factor``. The Trainer's own ``loss`` and
        ``epoch`` stay its own."""
        if "loss" in logs and self.history and self.batch_controller is not None:
            last = self.history[-1]
            ours = {name.removeprefix("train/"): value
                    for name, value in step_metrics(last, tokens=getattr(self, "_by_tokens", False)).items()
                    if name not in ("train/loss", "train/epoch") and math.isfinite(value)}
            logs = {**logs, **ours}
            if math.isfinite(last.noise_scale):
                logs["noise_scale"] = last.noise_scale
            if self._lr is not None:
                logs["lr_factor"] = self._lr.factor
        super().log(logs, start_time)

    def floating_point_ops(self, inputs: Any) -> int:
        if isinstance(inputs, StepBatch):
            return sum(super(AdaptiveBatchTrainer, self).floating_point_ops(mb) for mb in inputs.micro_batches)
        return super().floating_point_ops(inputs)

    def _track_num_input_tokens(self, inputs: Any) -> None:
        for batch in inputs.micro_batches if isinstance(inputs, StepBatch) else [inputs]:
            super()._track_num_input_tokens(batch)

    def _finalize_training(self, trial, num_train_samples, start_time):
        # With a growing B only the examples actually processed are right as the examples seen.
        if self.batch_controller is not None:
            num_train_samples = self._samples - self._samples_at_start
            if hasattr(self, "_initial_global_step"):
                # Recent 5.x Trainers report num_train_samples x steps run / max_steps (this
                # call's share of the schedule, set in the same release as this attribute);
                # earlier ones (5.17 tested) report num_train_samples as given.
                steps_run = max(self.state.global_step - self._initial_global_step, 1)
                num_train_samples = num_train_samples * max(self.state.max_steps, 1) / steps_run
        return super()._finalize_training(trial, num_train_samples, start_time)
