"""The memory probe: the largest micro-batch whose training step fits in device memory.

How it works (see ``probe_memory``): a training step's peak memory is computed without
allocating it, by running whole steps (forward, loss, backward, optimizer step, twice) on fake
tensors while counting live storage bytes. The peak is piecewise linear in the batch size, not
linear (where it occurs moves, e.g. from the optimizer step into the backward), so candidate
sizes are evaluated directly by an interpolation search instead of extrapolating a line fitted
at small sizes. On an accelerator, real steps then confirm the answer, backing off after an
out-of-memory error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from autobatch._state import preserved_state
from autobatch.batch import ForwardLoss, LossFn
from autobatch.config import parse_bytes
from autobatch.devices import AUTOCAST_DTYPES, canonical_device, model_device
from autobatch.memory import _step as step
from autobatch.memory.oom import is_oom_error, release_after_oom
from autobatch.optimizers import OptimizerSpec

__all__ = ["MemoryProbeResult", "largest_fitting", "probe_memory"]

Mode = Literal["auto", "estimate", "real"]
_MODES = ("auto", "estimate", "real")
# Back-off factor after a real step ran out of memory (the estimate cannot say by how much).
_OOM_SHRINK = 0.9
_MAX_REAL_ATTEMPTS = 8
# Batch sizes tried, in order, for the smallest one the model trains on (BatchNorm needs 2
# values per channel, so batch size 1 fails on a BatchNorm1d, or on 1x1 feature maps).
_SMALLEST_CANDIDATES = (1, 2, 4, 8)


def largest_fitting(peak: Callable[[int], int], limit: int, upper: int, lower: int = 1) -> int:
    """Largest ``b`` in ``[lower, upper]`` with ``peak(b) <= limit``, for a non-decreasing ``peak``.

    Interpolation search on a bracket ``lo`` (fits) < ``hi`` (does not): on a linear piece of
    ``peak`` the interpolated guess is exact, so a piecewise linear peak needs a few calls per
    piece crossed; a guess that keeps landing on the same side falls back to bisection, which
    bounds the calls by about ``2 * log2(upper)``.

    Raises:
        ValueError: if even ``peak(lower)`` exceeds ``limit``.
    """
    if peak(lower) > limit:
        raise ValueError(f"peak({lower})={peak(lower)} exceeds limit={limit}")
    if peak(upper) <= limit:
        return upper
    lo, hi = lower, upper
    last_side, repeats = "", 0
    while hi - lo > 1:
        p_lo, p_hi = peak(lo), peak(hi)
        if repeats >= 2 or p_hi <= p_lo:
            guess = (lo + hi) // 2
        else:
            guess = lo + (limit - p_lo) * (hi - lo) // (p_hi - p_lo)
        guess = min(max(guess, lo + 1), hi - 1)
        side = "lo" if peak(guess) <= limit else "hi"
        lo, hi = (guess, hi) if side == "lo" else (lo, guess)
        repeats = repeats + 1 if side == last_side else 1
        last_side = side
    return lo


class MemoryProbeResult(BaseModel):
    """What the probe found. Bytes are bytes (not MiB); batch sizes are micro-batch sizes.

    Attributes:
        max_micro_batch_size: the largest micro-batch whose training step peaks within
            ``limit_bytes``, or the ``max_micro_batch_size`` cap the probe was given.
        min_micro_batch_size: the smallest micro-batch the model trains on (2 for a model with
            BatchNorm that sees one value per channel at batch size 1); a training loop must
            not run a smaller one.
        peak_bytes_at_max: the step's peak at ``max_micro_batch_size``: measured by real steps in
            "real" mode, estimated in "estimate" mode.
        fixed_bytes: intercept of the chord through the estimated peaks at the smallest size and
            at the estimated size nearest ``max_micro_batch_size`` (parameters, gradients,
            optimizer state, ...).
        bytes_per_sample: slope of that chord: the average growth per example up to the answer.
        budget_bytes: the memory the step may use; ``limit_bytes = budget * (1 - margin)``.
        margin: fraction of the budget kept free (fragmentation, workspaces, longer batches).
        device: where the step runs.
        mode: "estimate" (fake tensors only) or "real" (estimate confirmed by real steps).
        real_steps: optimizer steps run on the real model (state restored afterwards).
        wall_time_s: the probe's wall-clock time in seconds.
        capped: whether the answer is the cap rather than the memory limit.
        estimated: estimated peak bytes at each batch size evaluated on fake tensors.
        measured: real-step peak bytes at each batch size tried (``None``: out of memory).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_micro_batch_size: int
    min_micro_batch_size: int = 1
    peak_bytes_at_max: int
    fixed_bytes: int
    bytes_per_sample: float
    budget_bytes: int
    margin: float
    device: str
    mode: Literal["estimate", "real"]
    real_steps: int
    wall_time_s: float
    capped: bool
    estimated: dict[int, int]
    measured: dict[int, int | None]

    @property
    def limit_bytes(self) -> int:
        """The bytes a step may peak at: ``budget_bytes * (1 - margin)``, rounded down."""
        return math.floor(self.budget_bytes * (1 - self.margin))

    def peak_bytes(self, batch_size: int) -> int:
        """Estimated peak bytes of a training step at ``batch_size``.

        Exact at the sizes in ``estimated``; linear between them, and beyond the largest one
        along the last piece (the peak is piecewise linear in the batch size).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got batch_size={batch_size})")
        sizes = sorted(self.estimated)
        if batch_size in self.estimated:
            return self.estimated[batch_size]
        if len(sizes) == 1:
            return round(self.fixed_bytes + self.bytes_per_sample * batch_size)
        right = next((i for i, b in enumerate(sizes) if b > batch_size), len(sizes) - 1)
        a, b = sizes[max(right - 1, 0)], sizes[max(right, 1)]
        slope = (self.estimated[b] - self.estimated[a]) / (b - a)
        return round(self.estimated[a] + slope * (batch_size - a))

    def table(self) -> str:
        """A readable summary, then one row per batch size evaluated."""
        mib = 2.0**20
        lines = [
            f"memory probe on {self.device} ({self.mode} mode)",
            f"  budget            {self.budget_bytes / mib:12.1f} MiB"
            f"  (margin {self.margin:.0%}, limit {self.limit_bytes / mib:.1f} MiB)",
            f"  max micro-batch   {self.max_micro_batch_size:12d}"
            f"{'  (the cap, not the memory limit)' if self.capped else ''}",
            f"  peak at max       {self.peak_bytes_at_max / mib:12.1f} MiB",
            f"  fixed + per-sample{self.fixed_bytes / mib:12.1f} MiB + "
            f"{self.bytes_per_sample / 1024:.1f} KiB x batch",
            f"  real steps        {self.real_steps:12d}",
            f"  wall time         {self.wall_time_s:12.2f} s",
            "",
            f"  {'batch':>8}  {'estimated MiB':>13}  {'measured MiB':>12}  fits",
        ]
        for b in sorted(set(self.estimated) | set(self.measured)):
            est = self.estimated.get(b)
            real = self.measured.get(b, "")
            peak = real if isinstance(real, int) else est
            fits = "OOM" if b in self.measured and real is None else (
                "yes" if peak is not None and peak <= self.limit_bytes else "no")
            est_s = "" if est is None else f"{est / mib:.1f}"
            real_s = real if not isinstance(real, int) else f"{real / mib:.1f}"
            lines.append(f"  {b:>8}  {est_s:>13}  {real_s or '':>12}  {fits}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of the estimated (and measured) peak against the micro-batch, both axes
        logarithmic, with the budget, the limit the search aimed at and the answer."""
        from autobatch._plots import plot_probe

        return plot_probe(self, path)


def _check_arguments(budget_bytes: Any, max_micro_batch_size: Any, margin: Any, mode: Any,
                     precision: Any) -> int | None:
    """Report every invalid argument at once; return the budget in bytes (None: unset)."""
    problems = []
    budget = None
    if budget_bytes is not None:
        try:
            budget = parse_bytes(budget_bytes)  # an int, or a string such as "4GiB"
        except (TypeError, ValueError) as err:
            numeric = isinstance(budget_bytes, (int, float)) and not isinstance(budget_bytes, bool)
            problems.append(f"budget_bytes must be > 0 bytes (got budget_bytes={budget_bytes!r})" if numeric
                            else f"budget_bytes: {err}")
    if not (isinstance(max_micro_batch_size, int) and max_micro_batch_size >= 1):
        problems.append(f"max_micro_batch_size must be an integer >= 1 (got "
                        f"max_micro_batch_size={max_micro_batch_size!r})")
    if not 0 <= margin < 1:
        problems.append(f"margin must be in [0, 1) (got margin={margin})")
    if mode not in _MODES:
        problems.append(f"mode must be one of {', '.join(map(repr, _MODES))} (got mode={mode!r})")
    if precision not in AUTOCAST_DTYPES:
        problems.append(f"precision must be one of {', '.join(map(repr, AUTOCAST_DTYPES))} (got precision={precision!r})")
    if problems:
        raise ValueError("invalid probe_memory arguments: " + "; ".join(problems))
    return budget


def default_budget_bytes(device: torch.device, resident_bytes: int) -> int:
    """The memory a step may use on ``device``: what is free plus what the model already holds.

    On CUDA: free device memory, plus what torch's caching allocator reserves but does not use,
    plus ``resident_bytes`` (the model and optimizer state already on the device, which the
    step's peak includes). On CPU: the kernel's MemAvailable plus ``resident_bytes``.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + unused_cache + resident_bytes
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024 + resident_bytes
        except (OSError, KeyError, ValueError):
            pass
    raise ValueError(
        f"cannot read the free memory of device {device}; pass budget_bytes (e.g. 4 * 2**30)"
    )


def probe_memory(
    model: torch.nn.Module,
    example: Any,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerSpec | None = torch.optim.Adam,
    *,
    forward_loss: ForwardLoss | None = None,
    device: torch.device | str | None = None,
    budget_bytes: int | str | None = None,
    max_micro_batch_size: int | None = None,
    margin: float = 0.1,
    mode: Mode = "auto",
    precision: str = "fp32",
) -> MemoryProbeResult:
    """Find the largest micro-batch whose training step fits in ``budget_bytes``.

    The probed workload is two training steps on one batch (forward, loss, backward,
    optimizer step), the gradients zeroed only after the second, so the peak includes the
    optimizer state, which is created lazily in the first step, and the gradients alive
    during a later micro-batch of gradient accumulation. The loss follows the batch protocol
    of every entry point (:mod:`autobatch.batch`): ``loss_fn(model(x1, ..., xk), target)``
    for a tuple batch, ``model(**batch).loss`` (or ``loss_fn(model(**batch), batch)``) for a
    dict, ``forward_loss(model, batch)`` for anything else; it must be a scalar. The model
    runs in train mode during the probe. The search starts at the smallest batch the model
    trains on: 1, or 2 (then 4, 8) when a step at 1 fails, as BatchNorm does with one value
    per channel (:attr:`MemoryProbeResult.min_micro_batch_size`).

    Nothing of the caller's is changed: weights, gradients, buffers (BatchNorm running stats),
    each module's train/eval flag, an optimizer instance's state and the RNG are as before.

    Args:
        model: the model, on the device the step runs on.
        example: one batch (a tensor, or a tuple/list/dict of tensors, examples along
            dimension 0), whose rows are repeated to build batches of any size; or a map-style
            Dataset (or DataLoader) whose longest item is repeated (the worst case for
            variable-length data).
        loss_fn: see above; mean- or sum-reduced makes no difference to memory. Optional
            for dict batches whose model output carries ``.loss`` (Hugging Face).
        optimizer: the optimizer spec of every entry point (:mod:`autobatch.optimizers`): a
            torch.optim class (called with the parameters alone), a factory ``params ->
            Optimizer`` (e.g. ``functools.partial(SGD, lr=0.1, momentum=0.9)``), or an
            optimizer instance (rebuilt faithfully over stand-in parameters; in "real" mode it
            takes the real steps itself, and its state is restored afterwards).
        forward_loss: ``forward_loss(model, batch) -> scalar loss`` for batches of any
            other form (then ``loss_fn`` is not used).
        device: where the step runs; defaults to the device of the model's parameters. In
            "estimate" mode it may differ from the model's (e.g. estimate for "cuda" with the
            model still on the CPU), where that device is available.
        budget_bytes: memory the step may use (parameters, gradients, optimizer state, batch
            and activations included): bytes, or a string such as ``"4GiB"`` or ``"500MB"``
            (read by :func:`autobatch.config.parse_bytes`, as fit's ``memory_budget``).
            Defaults to the device's free memory plus what the model and optimizer already
            hold there.
        max_micro_batch_size: the cap on the answer (>= 1; default 65,536), a micro-batch
            size like the answer.
        margin: fraction of the budget left unused, in [0, 1): the search targets
            ``budget_bytes * (1 - margin)``. Fake-tensor counts are exact on CPU; on an
            accelerator allocator caching, fragmentation and scratch that kernels allocate
            inside one op are not counted (on an H200 the allocator's peak was up to 23%
            above the estimate: cuDNN workspaces, bias GEMMs, Adam's multi-tensor step;
            ``mode="real"`` measures it), and longer batches may come later.
        mode: "estimate" (fake tensors only; any machine; no real step), "real" (the estimate
            confirmed by two real steps, backing off after an out-of-memory error; on CPU
            the steps run under ``autobatch.memory.oom.MemoryBudget(limit)``, so the OOM path is
            testable), or "auto": "real" on an accelerator, "estimate" on CPU.
        precision: "fp32", or "bf16" / "fp16" for a step whose forward and loss run under
            ``torch.autocast`` with that dtype (fit's ``precision``): activations saved for
            the backward are then mostly half size, so the answer is larger (the weights'
            half-precision copies are counted too). On CPU, bf16 kernels also allocate scratch
            inside an op that the count cannot see (5-37% of the step's peak on the test
            suite's small models, 2% on its transformer): keep the margin there.

    Returns:
        A :class:`MemoryProbeResult`.

    Raises:
        ValueError: for invalid arguments (all reported at once), an example without a batch
            dimension, a budget too small for a step at batch size 1 (the message says how
            many bytes are needed), or a device this machine does not have.
        Exception: whatever the model, loss or optimizer raises for a reason other than
            memory, re-raised unchanged with a note saying where the probe was.
    """
    started = time.perf_counter()
    max_micro_batch_size = 65_536 if max_micro_batch_size is None else max_micro_batch_size
    budget_bytes = _check_arguments(budget_bytes, max_micro_batch_size, margin, mode, precision)
    device = canonical_device(device) if device is not None else model_device(model)
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise ValueError(
                f"device {str(device)!r} is not available on this machine (fake tensors on it "
                "cannot run either); probe on the device you train on, or use device='cpu'"
            )
    real = (mode == "real") or (mode == "auto" and device.type != "cpu")
    if real and model_device(model) != device:
        raise ValueError(
            f"mode='real' runs real steps, so the model must be on {device} (it is on "
            f"{model_device(model)}); call model.to({str(device)!r}) first or use mode='estimate'"
        )
    template = step.template_batch(example, check_items=forward_loss is None)
    amp_dtype = AUTOCAST_DTYPES[precision]
    work = step.Workload(model, template, loss_fn, forward_loss, optimizer,
                         step.optimizer_maker(optimizer, model),
                         device=device, amp_dtype=amp_dtype)
    if budget_bytes is None:
        resident = step.LiveStorageBytes(device).track(model, optimizer)
        budget_bytes = default_budget_bytes(device, resident)
    limit = math.floor(budget_bytes * (1 - margin))

    estimated: dict[int, int] = {}
    measured: dict[int, int | None] = {}

    def estimate(batch_size: int) -> int:
        if batch_size not in estimated:
            try:
                estimated[batch_size] = step.fake_peak(work, batch_size, device)
            except Exception as exc:
                exc.add_note(f"(raised while autobatch.probe_memory ran a training step at batch "
                             f"size {batch_size} on fake tensors; not an out-of-memory error)")
                raise
        return estimated[batch_size]

    with preserved_state(model, optimizer, weights=real, offload=True, train=True):
        smallest = _smallest_batch(work, estimate, max_micro_batch_size)
        if estimate(smallest) > limit:
            need = estimated[smallest]
            whose = "one example's" if smallest == 1 else f"{smallest} examples'"
            raise ValueError(
                f"budget too small: a training step at batch size {smallest} needs {need:,} bytes "
                f"({need / 2**20:.1f} MiB: parameters, gradients, optimizer state and "
                f"{whose} activations), "
                f"but budget_bytes={budget_bytes:,} with margin={margin} allows {limit:,}; raise "
                f"budget_bytes to at least {math.ceil(need / (1 - margin)):,}"
            )
        best = largest_fitting(estimate, limit, max_micro_batch_size, lower=smallest)
        if real:
            best = _confirm(work, best, smallest, device, limit, estimate, measured)
    real_steps = 2 * len(measured)  # each attempt runs two optimizer steps (or fails in them)
    return _result(best, smallest, max_micro_batch_size, estimated, measured, budget_bytes,
                   margin, device, real, real_steps, time.perf_counter() - started)


def _smallest_batch(work: step.Workload, estimate: Callable[[int], int], cap: int) -> int:
    """The smallest batch size whose step runs on fake tensors: 1, else 2, 4, 8 (BatchNorm
    with one value per channel fails at 1). If all fail, the real step's error at batch
    size 1 is raised: the one the user would see in training."""
    first_error: Exception | None = None
    for size in (b for b in _SMALLEST_CANDIDATES if b <= cap):
        try:
            estimate(size)
            return size
        except Exception as exc:  # re-raised below, as the real step's error
            if is_oom_error(exc):
                raise
            first_error = first_error or exc
    assert first_error is not None
    step.raise_real_error(work, 1, first_error)


def _confirm(
    work: step.Workload, candidate: int, smallest: int, device: torch.device, limit: int,
    estimate: Callable[[int], int], measured: dict[int, int | None],
) -> int:
    """Run real steps at ``candidate``, backing off until they fit; return the size that did."""
    optimizer = work.optimizer
    for attempt in range(1, _MAX_REAL_ATTEMPTS + 1):
        opt = work.real_optimizer()
        peak = step.real_peak(work, opt, candidate, device, limit)
        del opt
        measured[candidate] = peak
        if peak is not None and peak <= limit:
            return candidate
        if peak is None:  # out of memory by an unknown amount: shrink 10%, then 19%, 27%, ...
            release_after_oom(work.model, optimizer if isinstance(optimizer, torch.optim.Optimizer)
                              else None, device)
            smaller = math.floor(candidate * _OOM_SHRINK**attempt)
        else:  # fit, but above the limit: shift the limit by what the estimate missed
            shifted = limit - (peak - estimate(candidate))
            if shifted < estimate(smallest):
                break
            smaller = largest_fitting(estimate, shifted, candidate, lower=smallest)
            smaller = min(smaller, candidate - 1)
        if smaller < smallest:
            break
        candidate = smaller
    raise ValueError(
        f"no batch size fits on {device}: real training steps ran out of memory (or past the "
        f"limit of {limit:,} bytes) down to batch size {candidate} (tried {sorted(measured)}); "
        "raise budget_bytes, free device memory, or shrink the model"
    )


def _result(
    best: int, smallest: int, cap: int, estimated: dict[int, int],
    measured: dict[int, int | None], budget_bytes: int, margin: float, device: torch.device,
    real: bool, real_steps: int, wall_time_s: float,
) -> MemoryProbeResult:
    limit = math.floor(budget_bytes * (1 - margin))
    peak_at_best = measured.get(best) or estimated.get(best, 0)
    # The chord from the smallest batch size to the estimated size nearest the answer.
    anchor = min((b for b in estimated if b != smallest), key=lambda b: abs(b - best), default=None)
    per_sample = 0.0 if anchor is None else (
        (estimated[anchor] - estimated[smallest]) / (anchor - smallest))
    return MemoryProbeResult(
        max_micro_batch_size=best,
        min_micro_batch_size=smallest,
        peak_bytes_at_max=peak_at_best,
        fixed_bytes=round(estimated[smallest] - per_sample * smallest),
        bytes_per_sample=per_sample,
        budget_bytes=int(budget_bytes),
        margin=margin,
        device=str(device),
        mode="real" if real else "estimate",
        real_steps=real_steps,
        wall_time_s=wall_time_s,
        capped=best == cap and estimated.get(cap, limit + 1) <= limit,
        estimated=dict(sorted(estimated.items())),
        measured=dict(sorted(measured.items())),
    )

