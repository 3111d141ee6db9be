"""The training loop behind ``autobatch.fit``, to be read top to bottom, and copied.

:func:`train` first sets up plain values, each with a ``setup_*`` function named for what it
builds (device and precision, the optimizer, the micro-batch cap the memory probe finds, the
controller, the sample order), then runs one optimizer step per iteration:

1. take the next B indices of the epoch's seeded order, and this rank's share of them;
2. set the LR: base LR (the user's ``lr_scheduler``, on a clock in samples) x the controller's
   factor (LR rule at B, capped, x the policy's factor x warm-up);
3. forward/backward over micro-batches no larger than the memory cap, each mean loss weighted
   by its loss items over the step's, so the accumulated gradient is the step's mean-loss
   gradient (an out-of-memory micro-batch halves the cap and the step is redone);
4. sync the gradients: under DDP one all-reduce that also carries the step's loss, norm
   totals and pending signals (nothing on one process);
5. read the step's loss and gradient norms: the step's one host sync;
6. the optimizer step (after clipping), or a skip that undoes the step if the loss or
   gradient is not finite;
7. the controller observes the step (noise-scale estimator, the policy's loss guard) and,
   every ``decide_every`` steps, decides the next B (rank 0's decision for all);
8. record, evaluate, checkpoint and call the callbacks when due.

A custom loop needs the same pieces: :class:`~autobatch.train.controller.BatchSizeController`
(micro-batch split, LR factor, decisions), :class:`~autobatch.train.sampler.SampleStream` (the
order), :func:`autobatch.accumulate.accumulate_gradients` (the weighting) and
:class:`~autobatch.noise.micro_batch.MicroBatchNormCollector` (the norms);
``examples/custom_loop.py`` is a complete one. ``step`` is the number of the step at hand,
counted from 1; once it is done, it is also the count of steps done.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.accumulate import LossItems, check_mean_reduced
from autobatch.batch import ForwardLoss, LossFn
from autobatch.config import FitConfig
from autobatch.data import as_batch_source
from autobatch.evaluate import EVAL_BATCH_SIZE, check_val_data, evaluate
from autobatch.noise.per_example import per_example_supported
from autobatch.noise.preconditioned import adam_preconditioner
from autobatch.optimizers import OptimizerSpec
from autobatch.policies.schedule import SchedulePolicy
from autobatch.run_length import RunLength
from autobatch.train._interrupt import DeferredSignals, Preempted, no_step_in_flight
from autobatch.train._resume import run_settings
from autobatch.train._skip import NonFiniteSteps
from autobatch.train._validate import validate_fit_args
from autobatch.train.callbacks import Callback, StopTraining, setup_loggers
from autobatch.train.checkpoint import restore_run, save_run
from autobatch.train.controller import build_controller
from autobatch.train.data_loader import MicroBatchLoader, setup_sample_stream, take_step
from autobatch.train.device import setup_device, setup_micro_batch_cap, setup_precision
from autobatch.train.distributed import (
    FlatGradientBuffer,
    agree_max,
    broadcast_buffers,
    broadcast_int,
    local_share,
    setup_distributed,
    sum_over_ranks,
    wrap_ddp,
)
from autobatch.train.optimizer import OptimizerScaling, set_lr, setup_optimizer
from autobatch.train.results import FitResult, StepRecord
from autobatch.train.sharded import sharded_layout
from autobatch.train.step import MicroBatchRun, clip_gradients, forward_backward, optimizer_step
from autobatch.train.step_norms import MeasureSchedule, StepNormMeter

__all__ = ["train"]


def train(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    val_data: Any = None,
    optimizer: OptimizerSpec = torch.optim.SGD,
    lr: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    config: FitConfig | dict[str, Any] | None = None,
    callbacks: Iterable[Callback] = (),
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    precision: str = "fp32",
    forward_loss: ForwardLoss | None = None,
    loss_items: LossItems = "auto",
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    val_loss_fn: LossFn | None = None,
    accuracy: str | bool = "auto",
    lr_search: Any = None,
    **config_overrides: Any,
) -> FitResult:
    """Train ``model`` on ``data`` with a batch size chosen, and re-chosen, by autobatch.

    The loop of :func:`autobatch.fit`, which documents every argument; here ``lr`` is a number
    (or None when the optimizer holds it): ``fit`` resolves ``lr="auto"`` with a study first
    and passes what it chose, with the study as ``lr_search`` (kept in the result and in
    checkpoints).

    Raises:
        ValueError: as listed in :func:`autobatch.fit`.
    """
    # -- setup: plain values, every bad setting refused before any work ----------------------
    validate_fit_args(model, data, val_data, optimizer, lr, epochs, max_steps, max_samples, device, checkpoint_dir,
                      max_tokens=max_tokens, val_loss_fn=val_loss_fn, eval_fn=eval_fn, forward_loss=forward_loss,
                      accuracy=accuracy)
    cfg = FitConfig.from_any(config, **config_overrides)
    run = RunLength(epochs, max_steps, max_samples, max_tokens)
    if not run.given:
        raise ValueError("fit needs a stopping rule: give epochs, max_steps, max_samples or max_tokens (got none)")
    if (cfg.batch.policy == "schedule" or isinstance(cfg.batch.policy, SchedulePolicy)) and lr_scheduler is None:
        raise ValueError("policy='schedule' grows the batch where lr_scheduler decays the LR, and none was given; "
                         "pass lr_scheduler=f(optimizer) -> scheduler (e.g. warm-up + cosine), or another policy")
    source = as_batch_source(data, check_items=forward_loss is None)
    val_source = as_batch_source(val_data, name="val_data", check_items=forward_loss is None) if val_data is not None else None
    device = setup_device(model, source, device)
    info = setup_distributed(device)
    sharded = sharded_layout(model, info, device, cfg.memory.fsdp_reduce)  # FSDP2, or None; checked first
    model.to(device)
    n, b0 = len(source), cfg.batch.initial_batch_size
    if b0 > n:
        raise ValueError(f"initial_batch_size={b0} is larger than the training set ({n} examples); "
                         f"pass initial_batch_size <= {n}")
    max_b = min(cfg.batch.max_batch_size or n, n)
    opt, base_lrs, scheduler = setup_optimizer(optimizer, model, lr, lr_scheduler)
    opt_scaling = OptimizerScaling(opt, betas=cfg.lr.scale_betas, weight_decay=cfg.lr.scale_weight_decay)
    amp_dtype, scaler = setup_precision(precision, device)
    eval_loss = val_loss_fn or loss_fn
    if val_source is not None and eval_fn is None:  # one forward now, not a failure after an epoch
        check_val_data(model, val_source, eval_loss, forward_loss=forward_loss, loss_items=loss_items, device=device,
                       amp_dtype=amp_dtype, accuracy=accuracy, loss_name="val_loss_fn" if val_loss_fn else "loss_fn")
    micro_cap, min_micro, probe = setup_micro_batch_cap(model, source, cfg, device, loss_fn=loss_fn,
                                                        forward_loss=forward_loss, optimizer=optimizer, lr=lr,
                                                        max_batch_size=max_b, precision=precision, sharded=sharded is not None)
    method = cfg.estimator.gns_method
    if sharded is not None:
        method = _check_sharded_run(cfg, method, info.world_size, sharded.data_parallel)
    elif method == "per_example" and (why := per_example_supported(model)) is not None:
        warnings.warn(f"gns_method='per_example' is not supported for this model ({why}); "
                      "measuring with micro-batch norms instead", stacklevel=3)
        method = "micro"
    # One micro-batch per step unless memory needs more: the meter splits the steps it measures.
    controller = build_controller(cfg, optimizer=opt, method=method, base_batch_size=b0, max_batch_size=max_b,
                                  micro_batch_size=micro_cap, min_micro_batches=1, run=run, num_examples=n,
                                  lr_scheduled=scheduler is not None)
    est = cfg.estimator
    schedule = MeasureSchedule(est.gns_every, overhead=est.gns_overhead, base_batch=b0, smoothing=est.gns_smoothing)
    preconditioner = _geometry(est.gns_geometry, opt, method, info.enabled or sharded is not None)
    meter = StepNormMeter(model, method, data_parallel=info.enabled, every=schedule, scaler=scaler,
                          first=round(1 / (1 - est.gns_smoothing)), min_micro=min_micro, sharded=sharded,
                          preconditioner=preconditioner)
    # a summed loss is refused here, before any step (and "auto" loss items read from the data)
    items_mode = check_mean_reduced(model, source, loss_fn=loss_fn, forward_loss=forward_loss, loss_items=loss_items,
                                    device=device if not source.on_device(device) else None, amp_dtype=amp_dtype,
                                    examples=micro_cap or len(source))
    stream = setup_sample_stream(source, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
    loader = MicroBatchLoader(source, cfg.data.num_workers, pin=device.type == "cuda")
    micro = MicroBatchRun(
        # Under torchrun every forward goes through DDP, inside no_sync: gradients are summed
        # by one all-reduce after all micro-batches (step 4 below). A sharded model is the
        # user's own: FSDP reduce-scatters in backward.
        model=wrap_ddp(model, device) if info.enabled and sharded is None else model,
        loader=loader, loss_fn=loss_fn, forward_loss=forward_loss, loss_items=items_mode,
        device=device, move=not source.on_device(device), amp_dtype=amp_dtype, scaler=scaler, info=info,
        # On CPU a budget is enforced by counting live storage bytes (the same guard the probe
        # uses), so OOM handling is exercised where no device limit exists.
        memory_budget=cfg.memory.memory_budget if device.type == "cpu" else None, sharded=sharded)
    grad_buffer = FlatGradientBuffer()  # the data-parallel all-reduce's, kept between steps
    params = meter.params
    callbacks = [*callbacks, *setup_loggers(cfg.log, resume=resume, tokens=micro.loss_items != "examples",
                                            probe=probe, main=info.is_main)]
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    has_eval = val_source is not None or eval_fn is not None
    bar = _progress_bar(cfg, run.examples(n)) if info.is_main else None
    min_step = min_micro * info.world_size  # the smallest step (global examples) the model trains on
    # What gives the run its meaning: saved with every checkpoint, and a resume must match it
    settings = run_settings(cfg, model=model, optimizer=opt, base_lrs=base_lrs, scheduler=scheduler,
                            controller=controller, num_examples=stream.num_examples, loss_items=items_mode,
                            precision=precision)

    def save(result: FitResult) -> None:  # rank 0 writes last.pt; every rank its shards under FSDP
        if ckpt_dir is not None and (info.is_main or sharded is not None):
            save_run(ckpt_dir, model=model, optimizer=opt, controller=controller, measure_schedule=schedule,
                     stream=stream, scheduler=scheduler, scaler=scaler, result=result, settings=settings,
                     is_main=info.is_main, sharded=sharded is not None)

    # Refuses a checkpoint that does not fit this run before it changes anything
    saved = restore_run(ckpt_dir, model=model, optimizer=opt, controller=controller, measure_schedule=schedule,
                        stream=stream, scheduler=scheduler, scaler=scaler, settings=settings,
                        sharded=sharded is not None) if resume and ckpt_dir else None
    result = FitResult(model=model, **saved) if saved is not None else FitResult(model=model)
    result.lr_search = lr_search or result.lr_search
    step, samples = result.steps, result.samples
    nonfinite = NonFiniteSteps(model, opt, scaler, cfg.max_nonfinite_steps)
    start = time.perf_counter() - result.wall_time_s
    eval_every, checkpoint_every, log_every = cfg.log.eval_every, cfg.log.checkpoint_every, cfg.log.log_every

    def update_totals() -> None:
        result.steps, result.samples, result.epochs = step, samples, stream.epochs_done
        result.max_micro_batch_size = controller.max_micro_batch_size
        result.wall_time_s = time.perf_counter() - start

    def run_eval() -> None:
        # Forwards no larger than training's (the probed cap, halved after an OOM); under FSDP
        # the processes halve an out-of-memory batch together, as their collectives must match.
        metrics = eval_fn(model) if eval_fn is not None else evaluate(
            model, val_source, eval_loss, forward_loss=forward_loss, loss_items=loss_items, device=device,
            batch_size=controller.max_micro_batch_size or EVAL_BATCH_SIZE, amp_dtype=amp_dtype, accuracy=accuracy,
            agree=(lambda size: int(agree_max(size, info, device))) if sharded is not None else None)
        result.evals.append({"step": step, "epoch": stream.epochs_done, "samples": samples, **metrics})
        result.final_metrics = dict(metrics)
        stop = None
        for cb in callbacks:  # every callback sees the evaluation before a stop takes effect
            try:
                cb.on_eval(step, samples, dict(metrics))
            except StopTraining as err:
                stop = err
        if stop is not None:
            raise stop

    # -- the loop: one optimizer step per iteration ------------------------------------------
    model.train()
    signals = DeferredSignals(info, device)  # SIGINT/SIGTERM wait for the step to finish
    agreed_signals = None  # under DDP, the flags the last step's all-reduce summed over ranks
    stopped_by = None
    try:
        while (reason := run.reached(step, samples, stream.epochs_done,
                                     result.history[-1].loss_items if result.history else 0)) is None:
            signals.check(agreed_signals)  # between steps: a checkpoint describes one moment
            step += 1
            # 1. the step's examples, in the epoch's seeded order, and this rank's share
            epoch_before = stream.epoch
            if stream.position == 0:
                loader.new_epoch()  # the step opens an epoch: workers restart if the user's DataLoader said so
            indices, carried = take_step(stream, controller.batch_size, min_step, cfg.data.small_tail)
            result.small_tails += carried
            step_b = indices.shape[0]
            # 2. the LR for this B and step (the user's schedule on a clock in samples)
            base_lr = set_lr(opt, base_lrs, scheduler, controller.lr_factor(step), clock=samples // b0)[0]
            if opt_scaling.active:  # Adam's betas and AdamW's decay per example (settings)
                opt_scaling.apply(opt, step_b / b0, controller.lr_factor())
            nonfinite.before_step()  # the forward writes BatchNorm statistics; a skip undoes it
            # 3. forward/backward of every micro-batch; an OOM anywhere redoes the step (buffers reset)
            work = forward_backward(micro, local_share(indices, info), step_b, step, meter=meter,
                                    controller=controller, optimizer=opt, before_retry=nonfinite.restore_buffers)
            result.oom_retries += work.oom_retries
            # 4. gradient sync: one all-reduce of the gradients (DDP), carrying the step's totals;
            #    FSDP reduce-scattered them in backward, and the totals go alone
            totals = meter.local_totals(work.acc.loss, work.sizes, step_b)
            summed, flat_grad = totals.tensors, None
            flags = [torch.full((), f, device=device) for f in signals.flags()] if info.enabled else []
            if sharded is not None:
                summed = sum_over_ranks(totals.tensors + flags, info)
            elif info.enabled:
                summed, flat_grad = grad_buffer.all_reduce(params, info, totals.tensors + flags,
                                                           local_sq_norm=totals.own_norm)
            # 5. the step's loss and norms, summed over ranks: the step's one host sync
            train_loss, norms, extra = meter.read(summed, step_b, flat_grad)
            agreed_signals = (extra[0], extra[1]) if info.enabled else None
            finite = math.isfinite(train_loss) and (norms is None or math.isfinite(norms.big_sq_norm))
            # 6. the optimizer step, unless the loss or gradient is not finite
            if finite:
                nonfinite.finite()
                clip_gradients(params, cfg.lr.max_grad_norm, norms if preconditioner is None else None,  # raw norm
                               opt, scaler, sharded)  # after the norms were read
                optimizer_step(opt, scaler)
                broadcast_buffers(model, info)
            else:  # undone: buffers as before the step, warned once, counted
                result.skipped_steps += 1
                nonfinite.skip(step, stream.epochs_done, train_loss, norms)
            step_time = time.perf_counter() - work.started  # the attempt that fit, not the OOMs
            samples += step_b
            # 7. the controller sees the step (estimator, the policy's loss guard); every
            #    decide_every steps it decides the next B, rank 0's decision for all
            meter.observe_time(step_b, step_time)  # calibrates gns_every="auto"
            if schedule.every == "auto":  # sparser measurements: a longer EMA memory per update
                controller.estimator.smoothing = schedule.smoothing(step_b)
            controller.observe(step=step, epoch=stream.epochs_done, samples=samples, batch_size=step_b,
                               step_time_s=step_time, norms=norms if finite else None,
                               loss=train_loss if finite else None, base_lr=base_lr)
            est = controller.estimator
            record = StepRecord.trusted(  # no validation: the loop's own values
                step=step, epoch=stream.epochs_done, samples=samples, batch_size=controller.batch_size,
                examples=step_b, micro_batch_size=max(work.sizes, default=0), accum_steps=len(work.sizes),
                lr=float(opt.param_groups[0]["lr"]), base_lr=float(base_lr), train_loss=train_loss,
                grad_sq=est.grad_sq, trace_cov=est.trace_cov, noise_scale=est.noise_scale if est.ready else math.nan,
                noise_scale_stderr=est.noise_scale_stderr, wall_time_s=time.perf_counter() - start,
                skipped=not finite, loss_items=(result.history[-1].loss_items if result.history else 0) + work.items,
            )
            result.history.append(record)
            if step % controller.decide_every == 0:  # the policy picks the next B; rank 0's for all
                controller.maybe_decide(agree=(lambda b: broadcast_int(b, info, device)) if info.enabled else None)
            # 8. progress, callbacks, evaluation and checkpoint
            if bar is not None:
                bar.update(step_b)
                if step % log_every == 0:
                    bar.set_postfix_str(
                        f"step={step} ep={stream.epochs_done:.2f} B={record.micro_batch_size}x"
                        f"{record.accum_steps} gns={record.noise_scale:.3g} lr={record.lr:.3g} "
                        f"loss={train_loss:.4g}", refresh=False)
            for cb in callbacks:
                cb.on_step_end(record)
            due = (step % eval_every == 0) if eval_every else stream.epoch > epoch_before
            if has_eval and due:
                run_eval()
            if (has_eval and due) or (checkpoint_every and step % checkpoint_every == 0):
                update_totals()
                save(result)
        stopped_by = reason
    except StopTraining:
        stopped_by = "callback"
    except (KeyboardInterrupt, Preempted):
        # Only between steps (a second Ctrl-C raises at once, maybe mid-step: last.pt then stays as
        # it was): every example handed out trained on, and every step counted and recorded
        if no_step_in_flight(stream, samples) and len(result.history) == step:
            update_totals()
            save(result)
        raise
    finally:
        if stopped_by is None:  # leaving with an error: the handlers go back now
            signals.close()
        meter.close()
        loader.close()
        if micro.model is not model:
            # Free the DDP wrapper (and its reducer) now, while the process group is alive:
            # it sits in reference cycles that the collector might only reach after the
            # group is destroyed at exit.
            del micro
            gc.collect()
        if bar is not None:
            bar.close()
    # The final evaluation and save run with the handlers still installed: a signal that
    # arrives during them is raised once last.pt holds the complete run.
    try:
        if has_eval and (not result.evals or result.evals[-1]["step"] != step):
            with contextlib.suppress(StopTraining):
                run_eval()
        result.final_metrics["train_loss"] = result.history[-1].train_loss if result.history else math.nan
        result.stopped_by = stopped_by
        update_totals()
        save(result)
        for cb in callbacks:
            cb.on_fit_end(result)
    finally:
        signals.close()
    signals.check()  # a signal received in the last step or since: the run is complete and saved
    return result


def _geometry(geometry: str, optimizer: torch.optim.Optimizer, method: str,
              distributed: bool) -> Callable[[], Mapping[torch.Tensor, torch.Tensor]] | None:
    """The preconditioner the noise scale is measured in (``gns_geometry``), None for the raw
    gradients; a setting that cannot be measured is refused before any step."""
    if geometry == "raw":
        return None
    problems = []
    groups = [i for i, g in enumerate(optimizer.param_groups) if "betas" not in g or "eps" not in g]
    if groups:
        problems.append(f"gns_geometry='adam' reads Adam's second moments, and {type(optimizer).__name__}'s param "
                        f"groups {groups} have no betas/eps; use an Adam-family optimizer (Adam, AdamW, NAdam, "
                        "RAdam) or gns_geometry='raw'")
    if method != "micro":
        problems.append(f"gns_geometry='adam' is measured with gns_method='micro' (got {method!r})")
    if distributed:
        problems.append("gns_geometry='adam' is measured on one process only for now; under torchrun use "
                        "gns_geometry='raw'")
    if problems:
        raise ValueError("; ".join(problems))
    return functools.partial(adam_preconditioner, optimizer)


def _check_sharded_run(cfg: FitConfig, method: str, world_size: int, data_parallel: int) -> str:
    """The noise-scale method a sharded run measures with, after refusing what cannot work.

    Raises:
        ValueError: a global batch (initial or minimum) smaller than the number of processes
            (every FSDP process must run every forward), or a noise scale asked of a
            one-process FSDP run (no reduce-scatter runs to read it from).
    """
    b0, b_min = cfg.batch.initial_batch_size, cfg.batch.min_batch_size or cfg.batch.initial_batch_size
    if min(b0, b_min) < world_size:
        raise ValueError(
            f"under FSDP every one of the {world_size} processes must run every forward, so a step needs at least "
            f"{world_size} examples (got initial_batch_size={b0}, min_batch_size={b_min}); raise them to >= {world_size}"
        )
    if method == "per_example":
        warnings.warn("gns_method='per_example' is not supported for a model sharded with fully_shard; measuring "
                      "with micro-batch norms from FSDP's reduce-scatter instead", stacklevel=4)
        method = "micro"
    if method != "off" and data_parallel == 1:
        raise ValueError(
            "a model sharded with fully_shard on one process runs no reduce-scatter, so the noise scale cannot be "
            "read from it; run 2 or more processes, or pass gns_method='off' with policy='fixed' or 'ramp'"
        )
    return method


def _progress_bar(cfg: FitConfig, total_examples: int | None):
    """A tqdm bar counting examples, on a terminal (``cfg.log.progress``: True, False, or
    None for "if stderr is a terminal")."""
    show = cfg.log.progress if cfg.log.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_examples, unit="ex", dynamic_ncols=True, file=sys.stderr)
