"""``autobatch.fit``: train with a batch size that tracks the critical batch size.

The loop in :func:`fit` is meant to be read top to bottom, and copied. Per optimizer step:

1. take the next B indices of the epoch's seeded order (:class:`~autobatch.train.sampler.SampleStream`);
2. set the LR: base LR x scaling rule at B (x the policy's own factor, x warm-up);
3. split the step into micro-batches no larger than the memory cap, run forward/backward on
   each with its loss weighted by ``b_i / B`` (so the accumulated gradient is the mean over
   B), recording each micro-batch's squared gradient norm on the way (no extra backward);
   an out-of-memory micro-batch halves the cap and the same step is retried from scratch;
4. skip the step if the loss or gradient is not finite, else ``optimizer.step()``;
5. feed the step's norms to the noise-scale estimator, and every ``decide_every`` steps let
   the policy pick the next B;
6. evaluate, checkpoint and call the callbacks when due.

A custom loop needs the same pieces: a :class:`~autobatch.train.controller.BatchSizeController`
(micro-batch split, LR factor, decisions), a :class:`~autobatch.train.sampler.SampleStream` (the
order) and a :class:`~autobatch.noise.micro_batch.MicroBatchGradNorms` (the norms);
``examples/custom_loop.py`` shows the minimum.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.train.callbacks import Callback, StopTraining
from autobatch.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from autobatch.config import FitConfig
from autobatch.train.controller import BatchSizeController
from autobatch.data import as_batch_source, move_to
from autobatch.noise.estimator import GradientNoiseScale
from autobatch.train.distributed import (agree_max, all_reduce_gradients, broadcast_buffers, broadcast_int,
                                   combine_norms, local_share, setup_distributed)
from autobatch.noise.micro_batch import MicroBatchGradNorms, StepGradNorms, trainable_parameters
from autobatch.scaling import default_scaling, make_scaling
from autobatch.memory.oom import MemoryBudget, is_oom_error, release_after_oom
from autobatch.noise.per_example import PerExampleGradNorms
from autobatch.policies import make_policy
from autobatch.train._setup import (MicroBatchLoader, build_optimizer, precision_setup, probe_micro_cap,
                                  progress_bar, resolve_device, should_probe, total_samples, wrap_ddp)
from autobatch.train.evaluate import evaluate
from autobatch.train.results import FitResult, StepRecord
from autobatch.train.sampler import SampleStream

__all__ = ["fit"]

OptimizerSpec = type[torch.optim.Optimizer] | Callable[..., torch.optim.Optimizer] | torch.optim.Optimizer


def fit(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    val_data: Any = None,
    optimizer: OptimizerSpec = torch.optim.SGD,
    lr: float | None = None,
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
    **config_overrides: Any,
) -> FitResult:
    """Train ``model`` on ``data`` with a batch size chosen, and re-chosen, by autobatch.

    Args:
        model: the module to train, in place. Its forward takes the batch's input.
        data: training data: a map-style Dataset of ``(input, target)`` pairs, a tuple
            ``(X, y)`` of tensors or numpy arrays, or a DataLoader (its dataset and
            collate_fn are reused; its batch size is not).
        loss_fn: ``loss_fn(model(input), target)`` -> scalar, **mean-reduced** over the
            batch (a sum-reduced loss would scale the gradient with B and break both the LR
            rules and the noise scale).
        val_data: optional held-out data in the same forms; evaluated every
            ``eval_every`` steps (default: every epoch) and at the end.
        optimizer: a ``torch.optim.Optimizer`` class (built as ``cls(params, lr=lr)``), a
            factory ``f(params, lr) -> Optimizer``, or a built optimizer (its param groups'
            LRs are the base LRs unless ``lr`` is given).
        lr: the base learning rate, meant for the base batch ``initial_batch_size`` (B0);
            the scaling rule maps it to every other B.
        epochs, max_steps, max_samples: when to stop (the first reached wins); at least one.
            ``epochs`` may be fractional. ``max_samples`` counts examples processed.
        config: a :class:`~autobatch.config.FitConfig`, a dict, or None for the defaults.
        callbacks: :class:`~autobatch.train.callbacks.Callback` instances.
        device: where to train; the model is moved there. None: the model's device.
        checkpoint_dir: write ``last.pt`` there at every evaluation, every
            ``checkpoint_every`` steps, at the end, and on KeyboardInterrupt.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists: same batch sizes,
            same sample order, same weights as a run that was never stopped.
        eval_fn: ``eval_fn(model) -> {name: value}`` replacing the default evaluation
            (``val_loss``, and ``val_accuracy`` when outputs are class logits).
        precision: ``"fp32"``, ``"bf16"`` (autocast to bfloat16, CPU or GPU) or ``"fp16"``
            (CUDA autocast with a GradScaler; norms are measured after unscaling).
        **config_overrides: flat settings applied on top of ``config``, e.g.
            ``policy="goodput"``, ``max_batch_size=1024``.

    Returns:
        A :class:`~autobatch.train.results.FitResult` with the model, metrics and history.

    Raises:
        ValueError: for bad settings (every one named, with the fix), empty data, a base
            batch larger than the data, a non-scalar loss, model and data on different
            devices, or more than ``max_nonfinite_steps`` non-finite steps in a row.
    """
    cfg = FitConfig.from_any(config, **config_overrides)
    if epochs is None and max_steps is None and max_samples is None:
        raise ValueError(
            "fit needs a stopping rule: give epochs, max_steps or max_samples (got all three None)"
        )
    source = as_batch_source(data)
    val_source = as_batch_source(val_data, name="val_data") if val_data is not None else None
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
    opt = build_optimizer(optimizer, model, lr)
    base_lrs = [group["lr"] for group in opt.param_groups]
    amp_dtype, scaler = precision_setup(precision, device)

    budget = cfg.memory.memory_budget
    max_micro = cfg.memory.max_micro_batch_size
    if should_probe(cfg, device):
        max_micro = probe_micro_cap(model, source, loss_fn, optimizer, opt, device, cfg, max_b, max_micro)
    per_example = cfg.estimator.gns_method == "per_example"
    scaling_name = cfg.lr.lr_scaling or default_scaling(opt)
    if cfg.estimator.gns_method == "off" and (
        cfg.batch.policy in ("gns", "goodput") or scaling_name == "adascale"
    ):
        raise ValueError(
            f"gns_method='off' leaves policy={cfg.batch.policy!r} / lr_scaling={scaling_name!r} "
            "without the noise scale they need; use policy 'fixed' or 'ramp' with lr_scaling "
            "'linear', 'sqrt' or 'none', or measure with gns_method='micro'"
        )
    controller = BatchSizeController(
        policy=make_policy(cfg.batch.policy, cfg.batch, cfg.lr),
        scaling=make_scaling(scaling_name),
        estimator=GradientNoiseScale(cfg.estimator.gns_smoothing, min_updates=cfg.estimator.gns_min_updates),
        base_batch_size=b0,
        min_batch_size=min(cfg.batch.min_batch_size or b0, b0),
        max_batch_size=max_b,
        decide_every=cfg.batch.decide_every,
        max_micro_batch_size=max_micro,
        # Two micro-batches give the estimator its small batches; per-example norms or other
        # ranks' gradients already do, so one micro-batch per rank is enough there.
        min_micro_batches=1 if per_example or info.enabled else 2,
        max_lr_factor=cfg.lr.max_lr_factor,
    )
    stream = SampleStream(n, shuffle=cfg.data.shuffle, seed=cfg.data.seed)
    loader = MicroBatchLoader(source, cfg.data.num_workers, pin=device.type == "cuda")
    callbacks = list(callbacks)
    result = FitResult(model=model)
    step = samples = nonfinite_in_row = 0
    elapsed_before = 0.0
    if resume and checkpoint_dir is not None and (ckpt := load_checkpoint(checkpoint_dir)) is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        controller.load_state_dict(ckpt["controller"])
        stream.load_state_dict(ckpt["stream"])
        restore_rng(ckpt["rng"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        result = FitResult(model=model, **ckpt["result"])
        step, samples, elapsed_before = result.steps, result.samples, result.wall_time_s

    def checkpoint() -> None:
        if checkpoint_dir is None or not info.is_main:
            return
        save_checkpoint(checkpoint_dir, {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "controller": controller.state_dict(),
            "stream": stream.state_dict(),
            "rng": capture_rng(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "result": result.model_dump(exclude={"model"}),
        })

    def run_eval() -> None:
        metrics = eval_fn(model) if eval_fn is not None else evaluate(model, val_source, loss_fn, device=device, amp_dtype=amp_dtype)
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

    def done() -> str | None:
        if max_steps is not None and step >= max_steps:
            return "max_steps"
        if max_samples is not None and samples >= max_samples:
            return "max_samples"
        if epochs is not None and stream.epochs_done >= epochs:
            return "epochs"
        return None

    measure = cfg.estimator.gns_method != "off"
    collector = MicroBatchGradNorms(model, loss_reduction="mean") if measure else None
    pe_collector = PerExampleGradNorms(model) if per_example else None
    params = trainable_parameters(model)
    # Under torchrun every forward goes through DDP, inside no_sync: gradients are summed by
    # one all-reduce after all micro-batches (see autobatch.train.distributed for why).
    forward_model = wrap_ddp(model, device) if info.enabled else model
    # On CPU a budget is enforced by counting live storage bytes (the same guard the probe
    # uses), so OOM handling is exercised where no device limit exists.
    guard_budget = budget is not None and device.type == "cpu"
    bar = progress_bar(cfg, total_samples=total_samples(epochs, max_samples, n)) if info.is_main else None
    has_eval = val_source is not None or eval_fn is not None
    start = time.perf_counter() - elapsed_before
    model.train()
    try:
        while (reason := done()) is None:
            # 1. the step's examples, in the epoch's seeded order
            epoch_before = stream.epoch
            indices = stream.take(controller.batch_size)
            step_b = len(indices)
            # 2. the LR for this B
            warmup = min(1.0, (step + 1) / cfg.lr.warmup_steps) if cfg.lr.warmup_steps else 1.0
            factor = controller.lr_factor() * warmup
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * factor
            # 3. forward/backward over this rank's micro-batches; an OOM on any rank halves
            #    the micro-batch cap everywhere and the same step is retried from scratch
            local = local_share(indices, info)
            t0 = time.perf_counter()
            while True:
                sizes = controller.micro_sizes(len(local)) if len(local) else []
                # A rank whose share is one micro-batch needs no hooks: its local gradient,
                # read from the all-reduce buffer, is its small batch.
                use_hooks = measure and (per_example or not info.enabled or len(sizes) > 1)
                failed = 0
                try:
                    guard = MemoryBudget(budget, baseline=(model, opt)) if guard_budget else contextlib.nullcontext()
                    with guard:
                        loss_sum, pe_norms = _accumulate(forward_model, loss_fn, loader, local, sizes, step_b,
                                                         device, collector if use_hooks else None,
                                                         pe_collector, opt, amp_dtype, scaler)
                except Exception as err:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
                    if not is_oom_error(err):
                        raise
                    del err  # the traceback holds the failed step's tensors
                    failed = max(sizes)
                failed = int(agree_max(failed, info, device))
                if not failed:
                    break
                release_after_oom(model, opt, device)
                controller.on_oom(failed)
                result.oom_retries += 1
            grad_scale = scaler.get_scale() if scaler is not None else 1.0
            local_norms = (collector.end_step(grad_scale=grad_scale, min_micro_batches=1,
                                              big_norm=not info.enabled) if use_hooks else None)
            if pe_norms is not None:
                local_norms = _per_example_norms(pe_norms, local_norms)
            local_sq, reduced_sq = all_reduce_gradients(params, info, sq_norms=measure)
            if measure and not use_hooks and len(local):
                local_norms = _whole_share_norms(local_sq, len(local), step_b, grad_scale)
            # One CPU-GPU sync per step: the loss value (and the norms, read with it).
            loss_total = loss_sum.item()
            if info.enabled:
                big = reduced_sq / grad_scale**2
            else:
                big = local_norms.big_sq_norm if local_norms is not None else math.nan
            norms, loss_total = combine_norms(local_norms, big, step_b, info, device, also_sum=loss_total)
            train_loss = loss_total / step_b
            finite = math.isfinite(train_loss) and (norms is None or math.isfinite(norms.big_sq_norm))
            # 4. the optimizer step, unless the loss or gradient is not finite
            if finite:
                nonfinite_in_row = 0
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                broadcast_buffers(model, info)
            else:
                nonfinite_in_row += 1
                result.skipped_steps += 1
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.update()
                if nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{nonfinite_in_row} optimizer steps in a row had a non-finite loss or "
                        f"gradient (last train_loss={train_loss}, max_nonfinite_steps="
                        f"{cfg.max_nonfinite_steps}); lower lr, check the data, or raise "
                        "max_nonfinite_steps"
                    )
            step_time = time.perf_counter() - t0
            step += 1
            samples += step_b
            # 5. the estimator and the batch-size decision
            controller.observe(step=step, epoch=stream.epochs_done, samples=samples,
                               batch_size=step_b, step_time_s=step_time,
                               norms=norms if finite else None)
            est = controller.estimator
            record = StepRecord(
                step=step, epoch=stream.epochs_done, samples=samples,
                batch_size=controller.batch_size, examples=step_b, micro_batch_size=max(sizes), accum_steps=len(sizes), lr=opt.param_groups[0]["lr"],
                train_loss=train_loss, grad_sq=est.grad_sq, trace_cov=est.trace_cov,
                noise_scale=est.noise_scale if est.ready else math.nan,
                noise_stderr=est.noise_scale_stderr, wall_time_s=time.perf_counter() - start,
                skipped=not finite,
            )
            result.history.append(record)
            if controller.maybe_decide() is not None or step % controller.decide_every == 0:
                # rank 0 decides for all (its step times may differ from the others')
                controller.batch_size = broadcast_int(controller.batch_size, info, device)
            if bar is not None:
                bar.update(step_b)
                if step % cfg.log.log_every == 0:
                    bar.set_postfix_str(
                        f"step={step} ep={stream.epochs_done:.2f} B={record.micro_batch_size}x"
                        f"{record.accum_steps} gns={record.noise_scale:.3g} lr={record.lr:.3g} "
                        f"loss={train_loss:.4g}", refresh=False)
            for cb in callbacks:
                cb.on_step_end(record)
            # 6. evaluation and checkpoint
            every = cfg.log.eval_every
            due = (step % every == 0) if every else stream.epoch > epoch_before
            if has_eval and due:
                run_eval()
            if (has_eval and due) or (cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0):
                _update_totals(result, step, samples, stream, controller, start)
                checkpoint()
        stopped_by = reason
    except StopTraining:
        stopped_by = "callback"
    except KeyboardInterrupt:
        _update_totals(result, step, samples, stream, controller, start)
        checkpoint()
        raise
    finally:
        if collector is not None:
            collector.remove()
        if pe_collector is not None:
            pe_collector.remove()
        loader.close()
        if forward_model is not model:
            # Free the DDP wrapper (and its reducer) now, while the process group is alive:
            # it sits in reference cycles that the collector might only reach after the
            # group is destroyed at exit.
            forward_model = None
            gc.collect()
        if bar is not None:
            bar.close()
    if has_eval and (not result.evals or result.evals[-1]["step"] != step):
        with contextlib.suppress(StopTraining):
            run_eval()
    result.final_metrics["train_loss"] = result.history[-1].train_loss if result.history else math.nan
    result.stopped_by = stopped_by
    _update_totals(result, step, samples, stream, controller, start)
    checkpoint()
    for cb in callbacks:
        cb.on_fit_end(result)
    return result


def _accumulate(model, loss_fn, loader, indices, sizes, total, device, collector, pe_collector,
                opt, amp_dtype, scaler):
    """Forward/backward every micro-batch of this rank's share of one step.

    Each micro-batch's mean loss is weighted by ``b_i / total`` (``total`` = the global step
    size), so the gradients summed over micro-batches and ranks are the step's mean gradient.

    Returns:
        ``(loss_sum, per_example)``: the summed (not averaged) loss as a 0-d tensor on the
        device, and the per-example squared norms (list of tensors) or None.
    """
    opt.zero_grad(set_to_none=True)
    if collector is not None:
        collector.begin_step()
    loss_sum = torch.zeros((), device=device)
    per_example = [] if pe_collector is not None else None
    no_sync = model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext
    with no_sync():
        for chunk, batch in loader.micro_batches(indices, sizes):
            inputs, targets = move_to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = loss_fn(model(inputs), targets)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(
                    f"loss_fn must return a scalar tensor (got {shape}); reduce it with .mean() "
                    "(mean-reduced losses are what the LR rules and the noise scale assume)"
                )
            weight = chunk / total
            scaled = loss.float() * weight
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if collector is not None:
                collector.after_backward(batch_size=chunk, loss_weight=weight)
            if per_example is not None:
                scale = scaler.get_scale() if scaler is not None else 1.0
                per_example.append(pe_collector.sq_norms(loss_weight=weight, grad_scale=scale))
            loss_sum += loss.detach().float() * chunk
    return loss_sum, per_example


def _whole_share_norms(local_sq: float, local_b: int, total: int, grad_scale: float) -> StepGradNorms:
    """This rank's whole share as one small batch: its ``.grad`` before the all-reduce is
    ``grad_scale * (b/B) * G_b`` (the loss weight of a single micro-batch), so
    ``|G_b|^2 = local_sq / (grad_scale * b/B)^2``."""
    weight = grad_scale * local_b / total
    return StepGradNorms(small_sq_norms=[local_sq / weight**2], small_batch_size=float(local_b),
                         big_sq_norm=math.nan, big_batch_size=local_b, micro_batch_sizes=[local_b])


def _per_example_norms(per_example: list[torch.Tensor], micro: StepGradNorms | None) -> StepGradNorms | None:
    """Per-example squared norms as the small batches (``b = 1``) of this rank's step."""
    if micro is None or not per_example:
        return micro
    values = torch.cat(per_example).double().cpu().tolist()
    return StepGradNorms(small_sq_norms=values, small_batch_size=1.0, big_sq_norm=micro.big_sq_norm,
                         big_batch_size=micro.big_batch_size, micro_batch_sizes=[1] * len(values))


def _update_totals(result: FitResult, step, samples, stream, controller, start) -> None:
    result.steps, result.samples, result.epochs = step, samples, stream.epochs_done
    result.max_micro_batch_size = controller.max_micro_batch_size
    result.wall_time_s = time.perf_counter() - start
