"""The torch plumbing under the memory probe: batches of any size, the probed training step,
the optimizer it builds, and the two ways of measuring a step's peak (fake tensors, or real
steps on the device).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset

from autobatch._state import preserved_state
from autobatch.batch import ForwardLoss, LossFn, forward_and_loss
from autobatch.data import BatchSource, as_batch_source, move_to
from autobatch.devices import autocast, model_device
from autobatch.memory._count import LiveStorageBytes
from autobatch.memory.oom import MemoryBudget, is_oom_error
from autobatch.optimizers import OptimizerSpec, copy_for

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
    if isinstance(item, Mapping):
        return sum(_item_size(v) for v in item.values())
    if isinstance(item, (list, tuple)):
        return sum(_item_size(v) for v in item)
    return 1


def _plain(batch: Any) -> Any:
    """Mappings (e.g. a Hugging Face ``BatchEncoding``) as dicts, so pytrees see inside."""
    if isinstance(batch, Mapping):
        return {k: _plain(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_plain(v) for v in batch)
    return batch


def template_batch(example: Any, *, check_items: bool = True, max_scan: int = 10_000) -> Any:
    """The batch that batches of every size are built from, by repeating its rows.

    A batch is validated and used as it is. A map-style Dataset (or DataLoader, BatchSource)
    gives its longest item (by element count, over at most ``max_scan`` evenly spaced items)
    collated twice into one batch (never a 1-example batch: a collate function may need an
    even one): for variable-length data, every probed batch is made of the longest example,
    the worst case a padded batch can reach.
    """
    if isinstance(example, (Dataset, DataLoader, BatchSource)):
        source = as_batch_source(example, name="example", check_items=check_items)
        stride = max(1, len(source) // max_scan)
        longest = max(range(0, len(source), stride), key=lambda i: _item_size(source.dataset[i]))
        example = source.batch([longest, longest])  # a pair: a collate may need an even batch
    example = _plain(example)
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
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class Workload:
    """What the probe runs: the model, the batch it repeats, the loss by the batch protocol
    (:func:`autobatch.batch.forward_and_loss`), and the user's optimizer spec with its
    builder over stand-in parameters."""

    model: torch.nn.Module
    template: Any
    loss_fn: LossFn | None
    forward_loss: ForwardLoss | None
    optimizer: Any
    make_optimizer: OptimizerMaker
    device: torch.device = _CPU  # where the step runs (its autocast's device type)
    amp_dtype: torch.dtype | None = None  # the autocast dtype of mixed precision (None: full)

    def real_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer real steps use: the user's instance itself, or one over the model."""
        if isinstance(self.optimizer, torch.optim.Optimizer):
            return self.optimizer
        return self.make_optimizer({p: p for p in self.model.parameters()})


def run_steps(work: Workload, optimizer: torch.optim.Optimizer, batch: Any) -> None:
    """The probed workload: two forward/backward passes on ``batch``, each followed by an
    optimizer step, with the gradients set to ``None`` only at the end.

    The first step creates the optimizer's state (made lazily: Adam's moments, momentum
    buffers). The second pass runs with that state and the first pass's gradients alive, as a
    later micro-batch of an accumulated step does, and its backward adds into the existing
    gradients; so the peak covers the steady state and gradient accumulation, and no later
    step of a training loop peaks higher for the same batch. With mixed precision
    (``work.amp_dtype``) the forward and the loss run under ``torch.autocast``, as fit's step.
    """
    for _ in range(2):
        with autocast(work.device, work.amp_dtype):
            loss, output = forward_and_loss(work.model, batch, work.loss_fn, work.forward_loss)
        del output
        loss.backward()
        del loss
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_maker(optimizer: OptimizerSpec | None, model: torch.nn.Module) -> OptimizerMaker:
    """Turn the user's optimizer spec into a builder over stand-ins of the model's parameters.

    ``None`` means ``torch.optim.Adam`` (the largest state of the common optimizers).
    Classes, factories and instances are rebuilt by :func:`autobatch.optimizers.copy_for` (an
    instance faithfully: its class with every param group's hyperparameters). The spec is
    built once over the real parameters here (nothing is stepped), so that a bad spec fails
    before any probing.
    """
    spec = torch.optim.Adam if optimizer is None else optimizer
    copy_for(spec, {p: p for p in model.parameters()})
    return lambda stand_in: copy_for(spec, stand_in)


# ---------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def _optimizers_take_the_real_path() -> Iterator[None]:
    """Let torch.optim pick its default implementation for fake parameters as for real ones.

    An optimizer left to choose (``foreach=None``) takes the multi-tensor path only when every
    parameter's type is a plain tensor, so over fake tensors it took the single-tensor path,
    whose temporaries differ: on an H200, the fake Adam step of an MLP at batch 256 counted
    450 MiB where the real (multi-tensor) step's storages peaked at 402 MiB. FakeTensor is
    listed among the accepted types while the fake step runs, so both run the same ops.
    """
    import torch.optim.optimizer as optim_base
    from torch._subclasses.fake_tensor import FakeTensor

    types = getattr(optim_base, "_foreach_supported_types", None)
    if not isinstance(types, list) or FakeTensor in types:  # another torch: leave it alone
        yield
        return
    types.append(FakeTensor)
    try:
        yield
    finally:
        types.remove(FakeTensor)


def fake_peak(work: Workload, batch_size: int, device: torch.device) -> int:
    """Peak live bytes of :func:`run_steps` at ``batch_size`` on ``device``, allocating nothing.

    The parameters, buffers and batch are fake tensors (shapes, dtypes and devices only),
    swapped into the model for the duration of the steps (as ``torch.func.functional_call``
    does), so its own tensors are never touched and a ``forward_loss`` sees the model itself.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = work.model
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter = LiveStorageBytes(device)
    with fake_mode:
        params = {p: fake_mode.from_tensor(p).to(device).detach().requires_grad_(p.requires_grad)
                  for p in model.parameters()}
        state = {name: params[p] for name, p in model.named_parameters()}
        state.update({name: fake_mode.from_tensor(b).to(device).detach()
                      for name, b in model.named_buffers()})

    # FakeTensorMode logs every exception an op raises; the caller reports it once, better.
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level, log.level = log.level, logging.CRITICAL
    try:
        with fake_mode, counter, _reparametrize_module(model, state, tie_weights=True), \
                _optimizers_take_the_real_path():
            counter.track(state)
            batch = fake_resized(work.template, batch_size, device)
            counter.track(batch)
            run_steps(work, work.make_optimizer(params), batch)
    finally:
        log.setLevel(level)
    return counter.peak_bytes


def raise_real_error(work: Workload, batch_size: int, fake_error: Exception) -> NoReturn:
    """After a step on fake tensors failed at every small batch size, raise the error the
    user would see.

    Runs the step for real at ``batch_size`` on the model's own device (state restored): its
    exception is the genuine one (fake tensors word some errors differently). If the real
    step succeeds, fake tensors cannot run this model, and that is what is raised.
    """
    model = work.model
    device = model_device(model)
    with preserved_state(model, work.optimizer, weights=True, offload=True, train=True):
        batch = move_to(resized(work.template, batch_size), device)
        try:
            run_steps(work, work.real_optimizer(), batch)
        except Exception as exc:
            if not is_oom_error(exc):
                exc.add_note(f"(raised by a real training step at batch size {batch_size} that "
                             "autobatch.probe_memory ran: not an out-of-memory error)")
            raise
    raise RuntimeError(
        f"fake tensors cannot run this model's training step, although it runs on real tensors "
        f"({type(fake_error).__name__}: {fake_error}); typical causes are ops whose output size "
        "depends on tensor values (nonzero, boolean masks, .item() in control flow)"
    ) from fake_error


def real_peak(
    work: Workload,
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
    model = work.model
    batch = move_to(resized(work.template, batch_size), device)
    model.zero_grad(set_to_none=True)
    try:
        if device.type == "cpu":
            guard = MemoryBudget(limit_bytes, baseline=(model, optimizer, batch), device="cpu")
            with guard:
                run_steps(work, optimizer, batch)
            return guard.peak_bytes
        resident = LiveStorageBytes(device).track(model, optimizer, batch)  # already allocated
        accel = torch.cuda if device.type == "cuda" else torch.accelerator
        accel.synchronize(device)
        accel.reset_peak_memory_stats(device)
        before = accel.memory_allocated(device)
        run_steps(work, optimizer, batch)
        accel.synchronize(device)
        return accel.max_memory_allocated(device) - before + resident
    except Exception as exc:
        if not is_oom_error(exc):
            raise
    return None
