"""``autobatch.fit``, the entry point: ``lr="auto"`` resolved by a short study, then the loop.

The study (:mod:`autobatch.tune.auto_lr`) trains with the loop itself
(:func:`autobatch.train.loop.train`), so ``lr="auto"`` is resolved here, above both, and the
loop never imports the studies. The user's data is converted to a
:class:`~autobatch.data.BatchSource` once, here, and both see the same one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autobatch.accumulate import LossItems
from autobatch.batch import ForwardLoss, LossFn
from autobatch.config import FitConfig
from autobatch.data import as_batch_source
from autobatch.optimizers import OptimizerSpec
from autobatch.train._validate import evaluation_errors
from autobatch.train.callbacks import Callback
from autobatch.train.loop import train
from autobatch.train.results import FitResult

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
            ``eval_every`` steps (default: every epoch) and at the end, in forwards no larger
            than training's micro-batch cap (an out-of-memory one is halved). Its first
            examples run through the model and the loss before training, so data the model
            or loss cannot read fails then.
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
        epochs, max_steps, max_samples, max_tokens: when to stop (the first reached wins); at
            least one. ``epochs`` may be fractional. ``max_samples`` counts examples processed,
            ``max_tokens`` loss items (tokens that are not -100 for a language model; examples
            with ``loss_items="examples"``), checked after each step, so the last step may pass
            it. Under ``max_tokens`` alone a policy sees no fraction of the run done
            (``PolicyContext.progress`` is NaN); ``lr="auto"`` needs one of the others.
        config: a :class:`~autobatch.config.FitConfig`, a dict, or None for the defaults.
        callbacks: :class:`~autobatch.train.callbacks.Callback` instances: ``on_step_end(record)``
            after every optimizer step, ``on_eval(step, samples, metrics)`` after every
            evaluation, ``on_fit_end(result)`` once; raising
            :class:`~autobatch.train.callbacks.StopTraining` in one ends the run cleanly.
        device: where to train; the model is moved there. None: the model's device.
        checkpoint_dir: write ``last.pt`` there at every evaluation, every
            ``checkpoint_every`` steps, at the end, and on Ctrl-C or SIGTERM: the step in
            flight finishes first, then ``KeyboardInterrupt`` (SIGINT) or
            :class:`~autobatch.train._interrupt.Preempted` (SIGTERM, a ``SystemExit`` with
            status 143) is raised; resuming gives the run that was never stopped.
        resume: continue from ``checkpoint_dir/last.pt`` if it exists: same batch sizes,
            same sample order, same weights as a run that was never stopped. The checkpoint
            must be of this run: one written with other settings (B0, policy, LR rule, seed,
            shuffle, ...), another model, data set size or optimizer, or edited counters, is
            refused before anything is loaded, every difference named; the stopping rules,
            ``max_batch_size`` / ``min_batch_size`` (honoured from the first resumed step) and
            the display, evaluation, checkpoint and memory settings may change
            (:mod:`autobatch.train.checkpoint`).
        eval_fn: ``eval_fn(model) -> {name: value}`` replacing the default evaluation
            (``val_loss``, and ``val_accuracy`` when outputs are class or token logits).
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
        val_loss_fn: the loss of evaluations (``val_loss``, and the study of ``lr="auto"``
            on ``val_data``), in the form of ``loss_fn``; None: ``loss_fn``. For validation
            targets of another form than the training ones, e.g. a soft-target loss (Mixup,
            timm's ``SoftTargetCrossEntropy``) in training and ``cross_entropy`` on hard labels.
        accuracy: which target ``val_accuracy`` scores each prediction against
            (:mod:`autobatch.evaluate`): ``"auto"`` (the next token for a Hugging Face causal
            LM, the same position where the targets are a tensor of their own, and no accuracy,
            with a warning, where the targets are the inputs themselves: ``(x, x)`` batches
            with a loss of your own), ``"next_token"`` (position t against target t + 1),
            ``"same_position"``, or False (none).
        **config_overrides: flat settings applied on top of ``config``, e.g.
            ``policy="goodput"``, ``max_batch_size=1024``, ``max_grad_norm=1.0`` (clip the
            gradient's L2 norm after the noise-scale norms are read and before the optimizer
            step, unscaled under fp16), ``small_tail="drop"`` (a step too small for
            BatchNorm at an epoch's end: carried into the next step by default, see
            :class:`~autobatch.config.DataConfig`), ``loggers=["tensorboard", "jsonl"]`` with
            ``log_dir="runs/a"`` (each step's figures under stable names while the run goes,
            :mod:`autobatch.loggers`), ``policy="measure"`` (B0 and the LR kept, the noise scale
            only measured and logged).

    Returns:
        A :class:`~autobatch.train.results.FitResult` with the model, metrics and history.

    Raises:
        ValueError: for bad settings (every one named, with the fix), empty data, a base
            batch larger than the data, a non-scalar loss, model and data on different
            devices, ``val_data`` the model or loss cannot read, a checkpoint to resume from
            that does not fit this run, or more than
            ``max_nonfinite_steps`` non-finite steps in a row.
    """
    search = None
    if isinstance(lr, str):
        if lr != "auto":
            raise ValueError(f"lr must be a number > 0 or 'auto' (got lr={lr!r}); e.g. lr=0.1, or lr='auto' to "
                             "choose it with a short study first")
        if forward_loss is not None or loss_fn is None:
            raise ValueError("lr='auto' trains its trials through loss_fn(model(input), target): pass loss_fn (it "
                             "does not support forward_loss or a model's own .loss yet), or pass a number as lr")
        from autobatch.tune.auto_lr import choose_base_lr, resumed_search  # imports optuna

        if errors := evaluation_errors(val_data, val_loss_fn, eval_fn, forward_loss, accuracy):
            raise ValueError("; ".join(errors))  # before the study, not after it
        data = as_batch_source(data)  # converted once: the study and the run see the same source
        if val_data is not None:
            val_data = as_batch_source(val_data, name="val_data")
        search = resumed_search(checkpoint_dir) if resume else None
        if search is None:
            study_config = FitConfig.from_any(config, **config_overrides)
            study_config.log.loggers = []  # the loggers are the run's: the study's trials send them nothing
            search = choose_base_lr(
                model, data, loss_fn=loss_fn, val_data=val_data, val_loss_fn=val_loss_fn, optimizer=optimizer,
                epochs=epochs, max_steps=max_steps, max_samples=max_samples, config=study_config, device=device,
                precision=precision)
        lr = search.lr
    return train(model, data, loss_fn=loss_fn, val_data=val_data, optimizer=optimizer, lr=lr, epochs=epochs,
                 max_steps=max_steps, max_samples=max_samples, max_tokens=max_tokens, config=config, callbacks=callbacks,
                 device=device,
                 checkpoint_dir=checkpoint_dir, resume=resume, eval_fn=eval_fn, precision=precision,
                 forward_loss=forward_loss, loss_items=loss_items, lr_scheduler=lr_scheduler, val_loss_fn=val_loss_fn,
                 accuracy=accuracy, lr_search=search, **config_overrides)
