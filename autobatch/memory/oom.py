"""Out-of-memory handling shared by the memory probe and the training loop.

- :func:`is_oom_error` recognises every form an out-of-memory failure takes in torch.
- :func:`release_after_oom` frees what a failed step left behind.
- :func:`retry_after_oom` runs a step again after an out-of-memory error.
- :class:`MemoryBudget` makes a CPU run fail like a full device: it counts the live tensor
  storage bytes of the block and raises ``torch.OutOfMemoryError`` once they pass a budget, so
  the OOM path and the back-off can be tested on any machine.

The pattern both callers use::

    oom = False
    try:
        with MemoryBudget(budget_bytes, baseline=(model, optimizer, batch)):
            loss = step(batch)
    except Exception as exc:
        if not is_oom_error(exc):
            raise
        oom = True  # leave the except block first: its traceback holds the step's tensors
    if oom:
        release_after_oom(model, optimizer)  # and never step the optimizer on this batch
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from autobatch.devices import model_device
from autobatch.memory._count import LiveStorageBytes

__all__ = ["MemoryBudget", "is_oom_error", "release_after_oom", "retry_after_oom"]

T = TypeVar("T")

# Messages of RuntimeErrors that mean "the device ran out of memory" rather than a bug.
_OOM_MESSAGES = (
    "out of memory",  # CUDA, HIP (ROCm), XPU and MPS allocators
    "DefaultCPUAllocator: can't allocate memory",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's answer to a batch too large for its kernels
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory failure (retrying with a smaller batch may work).

    True for ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` is the same class,
    and :class:`MemoryBudget` raises it), Python's ``MemoryError``, and RuntimeErrors whose
    message is one of the allocator or cuDNN/cuBLAS out-of-memory messages.
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        message = str(exc)
        return any(text in message for text in _OOM_MESSAGES)
    return False


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type != "cpu":
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None and hasattr(accelerator, "empty_cache"):
            accelerator.empty_cache()


def release_after_oom(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    device: torch.device | str | None = None,
    *,
    keep_grads: bool = False,
) -> None:
    """Free what a failed training step left: gradients, garbage, the allocator's cache.

    Call it after leaving the ``except`` block that caught the OOM (the exception's traceback
    keeps the step's activations alive until then), and never step the optimizer on the
    failed batch: its gradients are partial.

    Args:
        model: its parameters' gradients are set to ``None``.
        optimizer: if given, every parameter it holds has its gradient set to ``None`` too
            (its state, e.g. Adam's moments, is kept).
        device: the device whose cache to empty; defaults to the model's first parameter's.
        keep_grads: leave the gradients alone (an evaluation, which made none, failed).
    """
    if not keep_grads:
        for p in model.parameters():
            p.grad = None
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    _empty_cache(torch.device(device) if device is not None else model_device(model))


def retry_after_oom(
    attempt: Callable[[], T],
    *,
    failed_size: Callable[[], int],
    on_oom: Callable[[int], None],
    agree: Callable[[int], int] | None = None,
) -> tuple[T, int]:
    """Run ``attempt()`` until a try does not run out of memory: the one retry loop of ``fit``
    and the Hugging Face integration.

    A try that raises an out-of-memory error (:func:`is_oom_error`) is followed, once the
    ``except`` block is left (its traceback holds the try's tensors), by ``on_oom(size)``:
    free memory, restore what the try changed, lower the micro-batch; then the next try.
    Any other error propagates.

    Args:
        attempt: one try; returns its result or raises.
        failed_size: the size (e.g. the largest micro-batch) of the try that just failed.
        on_oom: called with the failed size before the next try.
        agree: under data parallelism, the largest failed size over all processes (0 where
            none failed), called after every try, failed or not, so that an out-of-memory
            error on one rank makes every rank retry and none waits in a gradient collective.

    Returns:
        ``(result, retries)``: the result of the try that fit, and how many failed before it.
    """
    retries = 0
    while True:
        failed = 0
        try:
            result = attempt()
        except Exception as err:
            if not is_oom_error(err):
                raise
            del err  # the traceback holds the failed try's tensors
            failed = failed_size()
        if agree is not None:
            failed = agree(failed)
        if not failed:
            return result, retries
        on_oom(failed)
        retries += 1


class MemoryBudget(LiveStorageBytes):
    """A memory limit for a block of torch code, enforced by counting live storage bytes.

    Inside ``with MemoryBudget(budget_bytes):`` every aten op's new output storages are
    counted (a ``TorchDispatchMode`` holding weak references); once the live total exceeds
    ``budget_bytes``, the op raises ``torch.OutOfMemoryError``, as a full device would (the
    count includes the allocation that overflowed, which is dropped with the exception).
    ``peak_bytes`` holds the largest live total seen. Storages alive before the block count
    only if passed as ``baseline`` (or registered later with :meth:`track`).

    Meant for CPU runs, where there is no device limit to hit; on an accelerator the real
    allocator is the limit. Kernel scratch and allocator overhead are not counted.

    Args:
        budget_bytes: the limit in bytes (not MiB), > 0.
        baseline: objects whose tensors are already alive and count against the budget:
            modules (parameters, gradients, buffers), optimizers (state), tensors, or
            dicts/lists/tuples of them (e.g. the input batch).
        device: count only storages on this device type; ``None`` counts every device.

    Raises:
        ValueError: if ``budget_bytes`` is not positive.
        torch.OutOfMemoryError: on entry if the baseline alone exceeds the budget, or from
            the first op that takes the live total past it.
    """

    def __init__(
        self,
        budget_bytes: int,
        *,
        baseline: Any = (),
        device: torch.device | str | None = None,
    ) -> None:
        if not budget_bytes > 0:
            raise ValueError(
                f"budget_bytes must be > 0 (got budget_bytes={budget_bytes}); pass the memory "
                "limit in bytes, e.g. 4 * 2**30 for 4 GiB"
            )
        super().__init__(device)
        self.budget_bytes = int(budget_bytes)
        self._baseline = baseline

    def __enter__(self) -> MemoryBudget:
        self.track(self._baseline)
        self._baseline = ()  # hold no reference to the caller's tensors after registering
        self._check()
        return super().__enter__()

    def _check(self) -> None:
        if self.current_bytes > self.budget_bytes:
            raise torch.OutOfMemoryError(
                f"out of memory under MemoryBudget: {self.current_bytes:,} bytes live, budget "
                f"{self.budget_bytes:,} bytes (autobatch.memory.oom.MemoryBudget simulates a full "
                "device; use a smaller batch or a larger budget)"
            )
