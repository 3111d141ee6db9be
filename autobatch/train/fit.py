"""``autobatch.fit``: train with a batch size that tracks the critical batch size.

The loop in :func:`fit` is meant to be read top to bottom, and copied. Setup (data, device,
optimizer, precision, memory probe, controller, hooks) is gathered by
:func:`autobatch.train._setup.prepare`; then, per optimizer step:

1. take the next B indices of the epoch's seeded order (:class:`~autobatch.train.sampler.SampleStream`),
   and this rank's share of them;
2. set the LR: base LR (the user's ``lr_scheduler``, on a clock in samples, if any) x
   scaling rule at B (capped) x the policy's own factor x warm-up, the factor assembled by
   :meth:`BatchSizeController.lr_factor`;
3. run forward/backward over micro-batches no larger than the memory cap, each mean loss
   (:func:`autobatch.batch.forward_and_loss`) weighted by its loss items over the step's
   (:mod:`autobatch.accumulate`: examples, or tokens), so the accumulated gradient is the
   step's mean-loss gradient; an
   out-of-memory micro-batch halves the cap and the same step is retried from scratch
   (:func:`autobatch.train._step.forward_backward`);
4. read the step's loss and gradient norms, summed over ranks, in one host sync
   (:meth:`StepNormMeter.end_step`; under DDP the gradient all-reduce carries them). The
   only other syncs: under DDP the OOM agreement before it (one int), and with fp16 the
   GradScaler's own inf check in ``scaler.step``;
5. skip the step if the loss or gradient is not finite (undone: buffers restored, the fp16
   scale lowered; :class:`~autobatch.train._skip.NonFiniteSteps`), else ``optimizer.step()``;
6. feed the norms to the noise-scale estimator, and every ``decide_every`` steps let the
   policy pick the next B;
7. evaluate, checkpoint and call the callbacks when due.

A custom loop needs the same pieces: a :class:`~autobatch.train.controller.BatchSizeController`
(micro-batch split, LR factor, decisions), a :class:`~autobatch.train.sampler.SampleStream` (the
order) and a :class:`~autobatch.noise.micro_batch.MicroBatchNormCollector` (the norms);
``examples/custom_loop.py`` shows the minimum.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.accumulate import LossItems
from autobatch.batch import ForwardLoss, LossFn
from autobatch.config import FitConfig
from autobatch.train._interrupt import DeferredSignals, Preempted, no_step_in_flight
from autobatch.optimizers import OptimizerSpec
from autobatch.train._setup import Setup, prepare, resolve_base_lr
from autobatch.train._skip import NonFiniteSteps
from autobatch.train._step import forward_backward
from autobatch.train.callbacks import Callback, StopTraining
from autobatch.train.distributed import broadcast_buffers, broadcast_int, local_share
from autobatch.train.evaluate import evaluate
from autobatch.train.results import FitResult, StepRecord

__all__ = ["fit"]


def fit(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: LossFn | None = None,
    val_data: Any = None,
    optimizer: OptimizerSpec = torch.optim.SGD,
    lr: float | str | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    max_samples: int | None = None,
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
    **config_overrides: Any,
) -> FitResult:
    """Train ``model`` on ``data`` with a batch size chosen, and re-chosen, by autobatch.

    Args:
        model: the module to train, in place. Its forward takes the batch's inputs.
        data: training data: a map-style Dataset of ``(input, target)``, ``(x1, ..., xk,
            target)`` or dict items, a tuple ``(X, y)`` / ``(X1, ..., Xk, y)`` of tensors or
            numpy arrays, a dict of tensors, or a DataLoader (its dataset, collate_fn, which
            pads each micro-batch, and sampler are used; its batch size is not; a custom
            batch_sampler is refused).
        loss_fn: the batch protocol's loss (:mod:`autobatch.batch`):
            ``loss_fn(model(x1, ..., xk), target)`` for tuple batches,
            ``loss_fn(model(**batch), batch)`` for dict batches, where it is optional (None:
            the output's ``.loss``, as Hugging Face models return it). A scalar,
            **mean-reduced** over the batch's loss items (a sum-reduced loss would scale the
            gradient with B and break both the LR rules and the noise scale).
        val_data: optional held-out data in the same forms; evaluated every
            ``eval_every`` steps (default: every epoch) and at the end.
        optimizer: the optimizer spec of every entry point (:mod:`autobatch.optimizers`): a
            class (built as ``cls(params, lr=lr)``), a factory ``f(params)`` holding its
            hyperparameters (e.g. ``functools.partial(SGD, lr=0.1, momentum=0.9)``; then
            ``lr`` is optional), or a built optimizer (its param groups' LRs are the base LRs
            unless ``lr`` is given; the memory probe runs on a faithful copy).
        lr: the base learning rate, meant for the base batch ``initial_batch_size`` (B0);
            the scaling rule maps it to every other B. Needed unless the optimizer holds it.
            ``"auto"``: choose it first with a short successive-halving study on the same
            model, data and settings (at most half the run's examples more; a 10% hold-out of
            ``data`` scores it when ``val_data`` is None); ``FitResult.lr_search`` records it.
        epochs, max_steps, max_samples: when to stop (the first reached wins); at least one.
            ``epochs`` may be fractional. ``max_samples`` counts examples processed.
        config: a :class:`~autobatch.config.FitConfig`, a dict, or None for the defaults.
        callbacks: :class:`~autobatch.train.callbacks.Callback` instances.
        device: where to train; the model is moved there. None: the model's device.
        checkpoint_dir: write ``last.pt`` there at every evaluation, every
            ``checkpoint_every`` steps, at the end, and on Ctrl-C or SIGTERM: the step in
            flight finishes first, then ``KeyboardInterrupt`` (SIGINT) or
            :class:`~autobatch.train._interrupt.Preempted` (SIGTERM, a ``SystemExit`` with
            status 143) is raised; resuming gives the run that was never stopped.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists: same batch sizes,
            same sample order, same weights as a run that was never stopped.
        eval_fn: ``eval_fn(model) -> {name: value}`` replacing the default evaluation
            (``val_loss``, and ``val_accuracy`` when outputs are class logits).
        precision: ``"fp32"``, ``"bf16"`` (autocast to bfloat16, CPU or GPU) or ``"fp16"``
            (CUDA autocast with a GradScaler; norms are measured after unscaling).
        forward_loss: ``forward_loss(model, batch) -> loss`` for batches of any other form,
            replacing ``model(...)`` and ``loss_fn`` (the same escape hatch as everywhere).
        loss_items: what each micro-batch's mean loss is over (:mod:`autobatch.accumulate`):
            ``"auto"`` (tokens ``!= -100`` for a Hugging Face ``.loss`` of a dict batch with
            ``labels``, else examples), ``"examples"``, ``"tokens"`` or ``f(batch) -> count``.
            Micro-batches are weighted by their items over the step's (summed over ranks), so
            the accumulated gradient is exactly the step's token-mean gradient. Batch sizes,
            the history and the noise scale stay in examples.
        lr_scheduler: ``f(optimizer) -> torch LR scheduler`` (e.g. warm-up + cosine via
            ``LambdaLR`` or ``SequentialLR``): it sets the **base** LR over time, and
            autobatch's batch-size factor multiplies it (``StepRecord.base_lr`` and
            ``StepRecord.lr``). Its clock counts samples: it is stepped once per
            ``initial_batch_size`` examples processed (its "step" is ``samples // B0``), so a
            schedule written in steps of the base batch, or in epochs, keeps its meaning when
            B changes. Do not step it yourself.
        **config_overrides: flat settings applied on top of ``config``, e.g.
            ``policy="goodput"``, ``max_batch_size=1024``, ``max_grad_norm=1.0`` (clip the
            gradient's L2 norm after the noise-scale norms are read and before the optimizer
            step, unscaled under fp16), ``small_tail="drop"`` (a step too small for
            BatchNorm at an epoch's end: carried into the next step by default, see
            :class:`~autobatch.config.DataConfig`).

    Returns:
        A :class:`~autobatch.train.results.FitResult` with the model, metrics and history.

    Raises:
        ValueError: for bad settings (every one named, with the fix), empty data, a base
            batch larger than the data, a non-scalar loss, model and data on different
            devices, or more than ``max_nonfinite_steps`` non-finite steps in a row.
    """
    lr, lr_search = resolve_base_lr(  # lr="auto": a short study first (at most half the run's examples)
        lr, model, data, checkpoint_dir=checkpoint_dir, resume=resume, config=config,
        config_overrides=config_overrides, loss_fn=loss_fn, forward_loss=forward_loss, val_data=val_data,
        optimizer=optimizer, epochs=epochs, max_steps=max_steps, max_samples=max_samples, device=device,
        precision=precision)
    s = prepare(model, data, loss_fn=loss_fn, val_data=val_data, optimizer=optimizer, lr=lr,
                epochs=epochs, max_steps=max_steps, max_samples=max_samples, config=config,
                callbacks=callbacks, device=device, checkpoint_dir=checkpoint_dir, eval_fn=eval_fn,
                precision=precision, config_overrides=config_overrides, forward_loss=forward_loss,
                loss_items=loss_items, lr_scheduler=lr_scheduler)
    cfg, controller, stream, opt, info = s.cfg, s.controller, s.stream, s.opt, s.info
    result = (s.restore() if resume else None) or FitResult(model=model)
    result.lr_search = lr_search or result.lr_search
    step, samples = result.steps, result.samples
    nonfinite = NonFiniteSteps(model, opt, s.scaler, cfg.max_nonfinite_steps)
    start = time.perf_counter() - result.wall_time_s
    eval_every, checkpoint_every, log_every = cfg.log.eval_every, cfg.log.checkpoint_every, cfg.log.log_every

    def run_eval() -> None:
        metrics = s.eval_fn(model) if s.eval_fn is not None else evaluate(
            model, s.val_source, loss_fn, forward_loss=forward_loss, loss_items=loss_items,
            device=s.device, amp_dtype=s.amp_dtype)
        result.evals.append({"step": step, "epoch": stream.epochs_done, "samples": samples, **metrics})
        result.final_metrics = dict(metrics)
        stop = None
        for cb in s.callbacks:  # every callback sees the evaluation before a stop takes effect
            try:
                cb.on_eval(step, samples, dict(metrics))
            except StopTraining as err:
                stop = err
        if stop is not None:
            raise stop

    model.train()
    signals = DeferredSignals(s.info, s.device)  # SIGINT/SIGTERM wait for the step to finish
    try:
        while (reason := s.stop_reason(step, samples)) is None:
            signals.check(s.meter.agreed_signals)  # between steps, a checkpoint describes one moment
            # 1. the step's examples, in the epoch's seeded order, and this rank's share
            epoch_before = stream.epoch
            indices, tail = s.take(controller.batch_size)  # an epoch tail too small is carried
            result.small_tails += tail
            step_b = indices.shape[0]
            # 2. the LR for this B and step (x the user's schedule, on a clock in samples)
            s.set_lr(step, samples)
            nonfinite.before_step()  # the forward writes BatchNorm statistics; a skip undoes it
            # 3. forward/backward of every micro-batch; an OOM anywhere retries the step (buffers reset)
            acc = forward_backward(s, local_share(indices, info), step_b, step, nonfinite.restore_buffers)
            result.oom_retries += acc.oom_retries
            # 4. the loss and norms over all ranks: the step's one host sync is in end_step
            loss_sum, norms = s.meter.end_step(acc.loss_sum, acc.sizes, step_b, acc.loss_unit, signals.flags())
            train_loss = loss_sum / acc.total_items  # the mean over the step's loss items
            finite = math.isfinite(train_loss) and (norms is None or math.isfinite(norms.big_sq_norm))
            # 5. the optimizer step, unless the loss or gradient is not finite
            if finite:
                nonfinite.finite()
                s.clip_gradients(norms)  # after the norms were read: the estimator sees them unclipped
                if s.scaler is not None:
                    s.scaler.step(opt)
                    s.scaler.update()
                else:
                    opt.step()
                broadcast_buffers(model, info)
            else:  # undone: buffers as before the step, warned once, counted
                result.skipped_steps += 1
                nonfinite.skip(step, stream.epochs_done, train_loss, norms)
            step_time = time.perf_counter() - acc.started  # the attempt that fit, not the OOMs
            s.meter.observe_time(step_b, step_time)  # how often to measure ("auto" gns_every)
            step += 1
            samples += step_b
            # 6. the estimator, the step's record (B of this step), and every decide_every steps the
            #    batch-size decision for the next one
            controller.observe(step=step, epoch=stream.epochs_done, samples=samples, batch_size=step_b,
                               step_time_s=step_time, norms=norms if finite else None,
                               loss=train_loss if finite else None)
            est = controller.estimator
            record = StepRecord.trusted(  # no validation: the loop's own values
                step=step, epoch=stream.epochs_done, samples=samples, batch_size=controller.batch_size,
                examples=step_b, micro_batch_size=max(acc.sizes, default=0), accum_steps=len(acc.sizes),
                lr=float(opt.param_groups[0]["lr"]), base_lr=float(s.base_lr), train_loss=train_loss, grad_sq=est.grad_sq,
                trace_cov=est.trace_cov, noise_scale=est.noise_scale if est.ready else math.nan,
                noise_scale_stderr=est.noise_scale_stderr, wall_time_s=time.perf_counter() - start,
                skipped=not finite,
            )
            result.history.append(record)
            if step % controller.decide_every == 0:
                controller.maybe_decide()
                # rank 0 decides for all (its step times may differ from the others')
                controller.batch_size = broadcast_int(controller.batch_size, info, s.device)
            if s.bar is not None:
                s.bar.update(step_b)
                if step % log_every == 0:
                    s.bar.set_postfix_str(
                        f"step={step} ep={stream.epochs_done:.2f} B={record.micro_batch_size}x"
                        f"{record.accum_steps} gns={record.noise_scale:.3g} lr={record.lr:.3g} "
                        f"loss={train_loss:.4g}", refresh=False)
            for cb in s.callbacks:
                cb.on_step_end(record)
            # 7. evaluation and checkpoint
            due = (step % eval_every == 0) if eval_every else stream.epoch > epoch_before
            if s.has_eval and due:
                run_eval()
            if (s.has_eval and due) or (checkpoint_every and step % checkpoint_every == 0):
                _update_totals(result, s, step, samples, start)
                s.save(result)
        stopped_by = reason
    except StopTraining:
        stopped_by = "callback"
    except (KeyboardInterrupt, Preempted):
        if no_step_in_flight(stream, samples):  # else (a second Ctrl-C) last.pt stays as it was
            _update_totals(result, s, step, samples, start)
            s.save(result)
        raise
    finally:
        signals.close()
        s.close()
    if s.has_eval and (not result.evals or result.evals[-1]["step"] != step):
        with contextlib.suppress(StopTraining):
            run_eval()
    result.final_metrics["train_loss"] = result.history[-1].train_loss if result.history else math.nan
    result.stopped_by = stopped_by
    _update_totals(result, s, step, samples, start)
    s.save(result)
    for cb in s.callbacks:
        cb.on_fit_end(result)
    signals.check()  # a signal received in the last step: the run is complete and saved
    return result


def _update_totals(result: FitResult, s: Setup, step: int, samples: int, start: float) -> None:
    result.steps, result.samples, result.epochs = step, samples, s.stream.epochs_done
    result.max_micro_batch_size = s.controller.max_micro_batch_size
    result.wall_time_s = time.perf_counter() - start
