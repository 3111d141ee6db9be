"""The torch plumbing under the memory probe: batches of any size, the probed training step,
the optimizer it builds, the model state it must leave untouched, and the two ways of
measuring a step's peak (fake tensors, or real steps on the device).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset

from autobatch.memory._count import LiveStorageBytes
from autobatch.data import BatchSource, as_batch_source, move_to
from autobatch.memory.oom import MemoryBudget, is_oom_error

OptimizerSpec = type | torch.optim.Optimizer | Callable[..., torch.optim.Optimizer]
# builds an optimizer over stand-ins of the model's parameters: real param -> stand-in
OptimizerMaker = Callable[[dict[torch.Tensor, torch.Tensor]], torch.optim.Optimizer]


# ---------------------------------------------------------------------------- batches
def _tensors(batch: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(batch)[0] if isinstance(t, torch.Tensor)]


def check_batch(batch: Any) -> int:
    """Validate a batch (a tensor, or a tuple/list/dict of them) and return its batch size.

    Raises:
        ValueError: if it holds no tensor, a 0-d tensor, or tensors whose dimension 0 differ.
    """
    tensors = _tensors(batch)
    if not tensors:
        raise ValueError(
            f"example has no batch dimension: it holds no tensor (got a {type(batch).__name__});"
            " pass one batch (a tensor, or a tuple/dict of tensors with the examples along "
            "dimension 0) or a map-style Dataset"
        )
    shapes = [tuple(t.shape) for t in tensors]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            f"example has no batch dimension: it holds a 0-d tensor (shapes {shapes}); put the "
            "examples along dimension 0, e.g. x.unsqueeze(0) for a single example"
        )
    if len({s[0] for s in shapes}) > 1:
        raise ValueError(
            f"example has no common batch dimension: its tensors differ in dimension 0 (shapes "
            f"{shapes}); every tensor of a batch must hold the examples along dimension 0"
        )
    return shapes[0][0]


def _item_size(item: Any) -> int:
    if isinstance(item, torch.Tensor):
        return item.numel()
    if hasattr(item, "size") and hasattr(item, "shape"):  # numpy arrays
        return int(item.size)
    if isinstance(item, dict):
        return sum(_item_size(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_item_size(v) for v in item)
    return 1


def template_batch(example: Any, max_scan: int = 10_000) -> Any:
    """The batch that batches of every size are built from, by repeating its rows.

    A batch is validated and used as it is. A map-style Dataset (or DataLoader, BatchSource)
    gives its longest item (by element count, over at most ``max_scan`` evenly spaced items)
    collated alone: for variable-length data, every probed batch is made of the longest
    example, the worst case a padded batch can reach.
    """
    if isinstance(example, (Dataset, DataLoader, BatchSource)):
        source = as_batch_source(example, name="example")
        stride = max(1, len(source) // max_scan)
        longest = max(range(0, len(source), stride), key=lambda i: _item_size(source.dataset[i]))
        example = source.batch([longest])
    check_batch(example)
    return example


def resized(template: Any, batch_size: int) -> Any:
    """A real batch of ``batch_size`` rows, cycling through the template's rows."""
    rows = check_batch(template)
    index = torch.arange(batch_size) % rows
    return tree_map(lambda t: t[index.to(t.device)] if isinstance(t, torch.Tensor) else t, template)


def fake_resized(template: Any, batch_size: int, device: torch.device) -> Any:
    """Like :func:`resized` but with uninitialised tensors; call inside a FakeTensorMode."""

    def grow(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        return torch.empty((batch_size, *t.shape[1:]), dtype=t.dtype, device=device)

    return tree_map(grow, template)


# ---------------------------------------------------------------------------- the step
def batch_loss(forward: Callable[..., Any], batch: Any, loss_fn: Callable[..., Any]) -> Any:
    """The loss of one batch, by the convention every autobatch entry point uses.

    - tuple/list ``(inputs..., target)``: ``loss_fn(model(*inputs), target)``;
    - dict: ``loss_fn(model(**batch), batch)``;
    - a single tensor: ``loss_fn(model(batch), batch)``.
    """
    if isinstance(batch, dict):
        return loss_fn(forward(**batch), batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return loss_fn(forward(*batch[:-1]), batch[-1])
    return loss_fn(forward(batch), batch)


def run_steps(
    forward: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    batch: Any,
    loss_fn: Callable[..., Any],
) -> None:
    """The probed workload: two forward/backward passes on ``batch``, each followed by an
    optimizer step, with the gradients set to ``None`` only at the end.

    The first step creates the optimizer's state (made lazily: Adam's moments, momentum
    buffers). The second pass runs with that state and the first pass's gradients alive, as a
    later micro-batch of an accumulated step does, and its backward adds into the existing
    gradients; so the peak covers the steady state and gradient accumulation, and no later
    step of a training loop peaks higher for the same batch.
    """
    for _ in range(2):
        loss = batch_loss(forward, batch, loss_fn)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar tensor (got {shape}); reduce the loss, "
                "e.g. with reduction='mean'"
            )
        loss.backward()
        del loss
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_maker(optimizer: OptimizerSpec | None, model: torch.nn.Module) -> OptimizerMaker:
    """Turn what the user passed as ``optimizer`` into a builder over stand-in parameters.

    ``None`` means ``torch.optim.Adam`` (the largest state of the common optimizers). A class
    is called with the parameters alone; a callable is called as ``factory(params)`` with the
    model's parameters in ``model.parameters()`` order; an optimizer instance is rebuilt with
    the same class and the same per-group hyperparameters.
    """
    if optimizer is None:
        optimizer = torch.optim.Adam
    if isinstance(optimizer, torch.optim.Optimizer):
        instance = optimizer
        in_model = {p for p in model.parameters()}
        for group in instance.param_groups:
            if any(p not in in_model for p in group["params"]):
                raise ValueError(
                    "optimizer holds parameters that are not the model's; pass the optimizer "
                    "built over model.parameters(), or a factory such as "
                    "functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)"
                )

        def rebuild(stand_in: dict[torch.Tensor, torch.Tensor]) -> torch.optim.Optimizer:
            groups = [
                {**{k: v for k, v in g.items() if k != "params"},
                 "params": [stand_in[p] for p in g["params"]]}
                for g in instance.param_groups
            ]
            return type(instance)(groups)

        return rebuild
    if not callable(optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer class, an instance, or a factory "
            f"params -> Optimizer (got {type(optimizer).__name__})"
        )
    factory = optimizer
    return lambda stand_in: factory([stand_in[p] for p in model.parameters()])


# ---------------------------------------------------------------------------- state
@contextmanager
def preserved_state(
    model: torch.nn.Module, optimizer: Any, *, real: bool
) -> Iterator[None]:
    """Leave the model, the optimizer and the RNG as they were, whatever runs inside.

    Always: every module's train/eval flag, and the CPU and CUDA RNG states. With ``real``
    (steps run on the real parameters): parameters, buffers and gradients (copied to the CPU
    so that the copies take no device memory), and an optimizer instance's state dict.
    The model is put in train mode inside, since the probed step is a training step.
    """
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    tensors, grads, opt_state = [], [], None
    if real:
        with torch.no_grad():
            tensors = [(t, t.detach().to("cpu", copy=True))
                       for t in (*model.parameters(), *model.buffers())]
        grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True))
                 for p in model.parameters()]
        if isinstance(optimizer, torch.optim.Optimizer):
            opt_state = tree_map(
                lambda v: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v,
                copy.deepcopy(optimizer.state_dict()),
            )
        model.zero_grad(set_to_none=True)  # the copies are kept; the step starts from None
    if not model.training:
        model.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        with torch.no_grad():
            for t, saved in tensors:
                t.copy_(saved)
        for p, g in grads:
            p.grad = None if g is None else g.to(p.device)
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)


# ---------------------------------------------------------------------------- measuring
def fake_peak(
    model: torch.nn.Module,
    template: Any,
    loss_fn: Callable[..., Any],
    make_optimizer: OptimizerMaker,
    batch_size: int,
    device: torch.device,
) -> int:
    """Peak live bytes of :func:`run_steps` at ``batch_size`` on ``device``, allocating nothing.

    The parameters, buffers and batch are fake tensors (shapes, dtypes and devices only); the
    model runs through ``torch.func.functional_call``, so its own tensors are never touched.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter = LiveStorageBytes(device)
    with fake_mode:
        params = {p: fake_mode.from_tensor(p).to(device).detach().requires_grad_(p.requires_grad)
                  for p in model.parameters()}
        state = {name: params[p] for name, p in model.named_parameters()}
        state.update({name: fake_mode.from_tensor(b).to(device).detach()
                      for name, b in model.named_buffers()})

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, state, args, kwargs, tie_weights=True)

    # FakeTensorMode logs every exception an op raises; the caller reports it once, better.
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level, log.level = log.level, logging.CRITICAL
    try:
        with fake_mode, counter:
            counter.track(state)
            batch = fake_resized(template, batch_size, device)
            counter.track(batch)
            run_steps(forward, make_optimizer(params), batch, loss_fn)
    finally:
        log.setLevel(level)
    return counter.peak_bytes


def real_optimizer(
    optimizer: Any, make_optimizer: OptimizerMaker, model: torch.nn.Module
) -> torch.optim.Optimizer:
    """The optimizer real steps use: the user's instance itself, or a new one over the model."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    return make_optimizer({p: p for p in model.parameters()})


def raise_real_error(
    model: torch.nn.Module,
    template: Any,
    loss_fn: Callable[..., Any],
    optimizer: Any,
    make_optimizer: OptimizerMaker,
    fake_error: Exception,
) -> NoReturn:
    """After a step on fake tensors failed at batch size 1, raise the error the user would see.

    Runs the step for real at batch size 1 on the model's own device (state restored): its
    exception is the genuine one (fake tensors word some errors differently). If the real
    step succeeds, fake tensors cannot run this model, and that is what is raised.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with preserved_state(model, optimizer, real=True):
        batch = move_to(resized(template, 1), device)
        try:
            run_steps(model, real_optimizer(optimizer, make_optimizer, model), batch, loss_fn)
        except Exception as exc:
            if not is_oom_error(exc):
                exc.add_note("(raised by a real training step at batch size 1 that "
                             "autobatch.probe_memory ran: not an out-of-memory error)")
            raise
    raise RuntimeError(
        f"fake tensors cannot run this model's training step, although it runs on real tensors "
        f"({type(fake_error).__name__}: {fake_error}); typical causes are ops whose output size "
        "depends on tensor values (nonzero, boolean masks, .item() in control flow)"
    ) from fake_error


def real_peak(
    model: torch.nn.Module,
    template: Any,
    loss_fn: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    device: torch.device,
    limit_bytes: int,
) -> int | None:
    """Peak bytes of :func:`run_steps` run for real, or ``None`` if it ran out of memory.

    On CPU the steps run under :class:`~autobatch.memory.oom.MemoryBudget` (``limit_bytes``); on an
    accelerator the device allocator is the limit and the peak comes from its statistics.
    Either way the peak counts the same things as :func:`fake_peak`: parameters, buffers,
    optimizer state, the batch and everything the steps allocate. Errors other than
    out-of-memory propagate. The caller must call ``release_after_oom`` on ``None``.
    """
    batch = move_to(resized(template, batch_size), device)
    model.zero_grad(set_to_none=True)
    try:
        if device.type == "cpu":
            guard = MemoryBudget(limit_bytes, baseline=(model, optimizer, batch), device="cpu")
            with guard:
                run_steps(model, optimizer, batch, loss_fn)
            return guard.peak_bytes
        resident = LiveStorageBytes(device).track(model, optimizer, batch)  # already allocated
        accel = torch.cuda if device.type == "cuda" else torch.accelerator
        accel.synchronize(device)
        accel.reset_peak_memory_stats(device)
        before = accel.memory_allocated(device)
        run_steps(model, optimizer, batch, loss_fn)
        accel.synchronize(device)
        return accel.max_memory_allocated(device) - before + resident
    except Exception as exc:
        if not is_oom_error(exc):
            raise
    return None
