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

from autobatch.config import parse_bytes
from autobatch.memory import _step as step
from autobatch.memory.oom import release_after_oom

__all__ = ["MemoryProbe", "largest_fitting", "probe_memory"]

Mode = Literal["auto", "estimate", "real"]
_MODES = ("auto", "estimate", "real")
# Back-off factor after a real step ran out of memory (the estimate cannot say by how much).
_OOM_SHRINK = 0.9
_MAX_REAL_ATTEMPTS = 8


def largest_fitting(peak: Callable[[int], int], limit: int, upper: int) -> int:
    """Largest ``b`` in ``[1, upper]`` with ``peak(b) <= limit``, for a non-decreasing ``peak``.

    Interpolation search on a bracket ``lo`` (fits) < ``hi`` (does not): on a linear piece of
    ``peak`` the interpolated guess is exact, so a piecewise linear peak needs a few calls per
    piece crossed; a guess that keeps landing on the same side falls back to bisection, which
    bounds the calls by about ``2 * log2(upper)``.

    Raises:
        ValueError: if even ``peak(1)`` exceeds ``limit``.
    """
    if peak(1) > limit:
        raise ValueError(f"peak(1)={peak(1)} exceeds limit={limit}")
    if peak(upper) <= limit:
        return upper
    lo, hi = 1, upper
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


class MemoryProbe(BaseModel):
    """What the probe found. Bytes are bytes (not MiB); batch sizes are micro-batch sizes.

    Attributes:
        max_batch_size: the largest micro-batch whose training step peaks within
            ``limit_bytes``, or the ``max_batch_size`` cap the probe was given.
        peak_bytes_at_max: the step's peak at ``max_batch_size``: measured by real steps in
            "real" mode, estimated in "estimate" mode.
        fixed_bytes: intercept of the chord through the estimated peaks at batch size 1 and
            at the estimated size nearest ``max_batch_size`` (parameters, gradients,
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

    max_batch_size: int
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
            f"  max batch size    {self.max_batch_size:12d}"
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
        """Write a PNG of the estimated (and measured) peak vs batch size, with the budget."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        mib = 2.0**20
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        sizes = sorted(self.estimated)
        ax.plot(sizes, [self.estimated[b] / mib for b in sizes], "o-", label="estimated peak")
        real = sorted(b for b, v in self.measured.items() if v is not None)
        if real:
            ax.plot(real, [self.measured[b] / mib for b in real], "s", label="measured peak")
        ax.axhline(self.budget_bytes / mib, color="k", label="budget")
        ax.axhline(self.limit_bytes / mib, color="k", ls="--", label="budget x (1 - margin)")
        ax.axvline(self.max_batch_size, color="C2", ls=":",
                   label=f"max batch size {self.max_batch_size}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batch size")
        ax.set_ylabel("peak memory of a training step (MiB)")
        ax.set_title(f"memory probe on {self.device} ({self.mode})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _check_arguments(budget_bytes: Any, max_batch_size: Any, margin: Any, mode: Any) -> int | None:
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
    if not (isinstance(max_batch_size, int) and max_batch_size >= 1):
        problems.append(f"max_batch_size must be an integer >= 1 (got max_batch_size="
                        f"{max_batch_size!r})")
    if not 0 <= margin < 1:
        problems.append(f"margin must be in [0, 1) (got margin={margin})")
    if mode not in _MODES:
        problems.append(f"mode must be one of {', '.join(map(repr, _MODES))} (got mode={mode!r})")
    if problems:
        raise ValueError("invalid probe_memory arguments: " + "; ".join(problems))
    return budget


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


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
    loss_fn: Callable[..., torch.Tensor],
    optimizer: step.OptimizerSpec | None = torch.optim.Adam,
    *,
    device: torch.device | str | None = None,
    budget_bytes: int | str | None = None,
    max_batch_size: int = 65_536,
    margin: float = 0.1,
    mode: Mode = "auto",
) -> MemoryProbe:
    """Find the largest micro-batch whose training step fits in ``budget_bytes``.

    The probed workload is two training steps on one batch (forward, loss, backward,
    optimizer step), the gradients zeroed only after the second, so the peak includes the
    optimizer state, which is created lazily in the first step, and the gradients alive
    during a later micro-batch of gradient accumulation. The loss is computed as
    ``loss_fn(model(*inputs), target)`` for a batch ``(inputs..., target)``,
    ``loss_fn(model(**batch), batch)`` for a dict and ``loss_fn(model(batch), batch)`` for a
    tensor; it must be a scalar. The model runs in train mode during the probe.

    Nothing of the caller's is changed: weights, gradients, buffers (BatchNorm running stats),
    each module's train/eval flag, an optimizer instance's state and the RNG are as before.

    Args:
        model: the model, on the device the step runs on.
        example: one batch (a tensor, or a tuple/list/dict of tensors, examples along
            dimension 0), whose rows are repeated to build batches of any size; or a map-style
            Dataset (or DataLoader) whose longest item is repeated (the worst case for
            variable-length data).
        loss_fn: see above; mean- or sum-reduced makes no difference to memory.
        optimizer: a torch.optim class (called with the parameters alone), a factory
            ``params -> Optimizer`` (e.g. ``functools.partial(SGD, lr=0.1, momentum=0.9)``),
            or an optimizer instance (its class and per-group hyperparameters are used; in
            "real" mode it takes the real steps, and its state is restored afterwards).
        device: where the step runs; defaults to the device of the model's parameters. In
            "estimate" mode it may differ from the model's (e.g. estimate for "cuda" with the
            model still on the CPU), where that device is available.
        budget_bytes: memory the step may use (parameters, gradients, optimizer state, batch
            and activations included): bytes, or a string such as ``"4GiB"`` or ``"500MB"``
            (read by :func:`autobatch.config.parse_bytes`, as fit's ``memory_budget``).
            Defaults to the device's free memory plus what the model and optimizer already
            hold there.
        max_batch_size: the cap on the answer (>= 1).
        margin: fraction of the budget left unused, in [0, 1): the search targets
            ``budget_bytes * (1 - margin)``. Fake-tensor counts are exact on CPU; on an
            accelerator allocator caching, fragmentation and library workspaces are not
            counted, and longer batches may come later.
        mode: "estimate" (fake tensors only; any machine; no real step), "real" (the estimate
            confirmed by two real steps, backing off after an out-of-memory error; on CPU
            the steps run under ``autobatch.memory.oom.MemoryBudget(limit)``, so the OOM path is
            testable), or "auto": "real" on an accelerator, "estimate" on CPU.

    Returns:
        A :class:`MemoryProbe`.

    Raises:
        ValueError: for invalid arguments (all reported at once), an example without a batch
            dimension, a budget too small for a step at batch size 1 (the message says how
            many bytes are needed), or a device this machine does not have.
        Exception: whatever the model, loss or optimizer raises for a reason other than
            memory, re-raised unchanged with a note saying where the probe was.
    """
    started = time.perf_counter()
    budget_bytes = _check_arguments(budget_bytes, max_batch_size, margin, mode)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not backend.is_available():
            raise ValueError(
                f"device {str(device)!r} is not available on this machine (fake tensors on it "
                "cannot run either); probe on the device you train on, or use device='cpu'"
            )
    real = (mode == "real") or (mode == "auto" and device.type != "cpu")
    if real and _model_device(model) != device:
        raise ValueError(
            f"mode='real' runs real steps, so the model must be on {device} (it is on "
            f"{_model_device(model)}); call model.to({str(device)!r}) first or use mode='estimate'"
        )
    template = step.template_batch(example)
    make_optimizer = step.optimizer_maker(optimizer, model)
    if budget_bytes is None:
        resident = step.LiveStorageBytes(device).track(model, optimizer)
        budget_bytes = default_budget_bytes(device, resident)
    limit = math.floor(budget_bytes * (1 - margin))

    estimated: dict[int, int] = {}
    measured: dict[int, int | None] = {}

    def estimate(batch_size: int) -> int:
        if batch_size not in estimated:
            try:
                estimated[batch_size] = step.fake_peak(
                    model, template, loss_fn, make_optimizer, batch_size, device)
            except Exception as exc:
                if batch_size == 1:  # the real step's error is the one the user should see
                    step.raise_real_error(model, template, loss_fn, optimizer, make_optimizer, exc)
                exc.add_note(f"(raised while autobatch.probe_memory ran a training step at batch "
                             f"size {batch_size} on fake tensors; not an out-of-memory error)")
                raise
        return estimated[batch_size]

    with step.preserved_state(model, optimizer, real=real):
        if estimate(1) > limit:
            raise ValueError(
                f"budget too small: a training step at batch size 1 needs {estimated[1]:,} bytes "
                f"({estimated[1] / 2**20:.1f} MiB: parameters, gradients, optimizer state and "
                f"one example's activations), but budget_bytes={budget_bytes:,} with "
                f"margin={margin} allows {limit:,}; raise budget_bytes to at least "
                f"{math.ceil(estimated[1] / (1 - margin)):,}"
            )
        best = largest_fitting(estimate, limit, max_batch_size)
        if real:
            best = _confirm(model, template, loss_fn, optimizer, make_optimizer, best, device,
                            limit, estimate, measured)
    real_steps = 2 * len(measured)  # each attempt runs two optimizer steps (or fails in them)
    return _result(best, max_batch_size, estimated, measured, budget_bytes, margin, device,
                   real, real_steps, time.perf_counter() - started)


def _confirm(
    model: torch.nn.Module, template: Any, loss_fn: Callable[..., Any], optimizer: Any,
    make_optimizer: step.OptimizerMaker, candidate: int, device: torch.device, limit: int,
    estimate: Callable[[int], int], measured: dict[int, int | None],
) -> int:
    """Run real steps at ``candidate``, backing off until they fit; return the size that did."""
    for attempt in range(1, _MAX_REAL_ATTEMPTS + 1):
        opt = step.real_optimizer(optimizer, make_optimizer, model)
        peak = step.real_peak(model, template, loss_fn, opt, candidate, device, limit)
        del opt
        measured[candidate] = peak
        if peak is not None and peak <= limit:
            return candidate
        if peak is None:  # out of memory by an unknown amount: shrink 10%, then 19%, 27%, ...
            release_after_oom(model, optimizer if isinstance(optimizer, torch.optim.Optimizer)
                              else None, device)
            smaller = math.floor(candidate * _OOM_SHRINK**attempt)
        else:  # fit, but above the limit: shift the limit by what the estimate missed
            smaller = largest_fitting(estimate, limit - (peak - estimate(candidate)), candidate)
            smaller = min(smaller, candidate - 1)
        if smaller < 1:
            break
        candidate = smaller
    raise ValueError(
        f"no batch size fits on {device}: real training steps ran out of memory (or past the "
        f"limit of {limit:,} bytes) down to batch size {candidate} (tried {sorted(measured)}); "
        "raise budget_bytes, free device memory, or shrink the model"
    )


def _result(
    best: int, cap: int, estimated: dict[int, int], measured: dict[int, int | None],
    budget_bytes: int, margin: float, device: torch.device, real: bool, real_steps: int,
    wall_time_s: float,
) -> MemoryProbe:
    limit = math.floor(budget_bytes * (1 - margin))
    peak_at_best = measured.get(best) or estimated.get(best, 0)
    # The chord from batch size 1 to the estimated size nearest the answer.
    anchor = min((b for b in estimated if b != 1), key=lambda b: abs(b - best), default=None)
    per_sample = 0.0 if anchor is None else (estimated[anchor] - estimated[1]) / (anchor - 1)
    return MemoryProbe(
        max_batch_size=best,
        peak_bytes_at_max=peak_at_best,
        fixed_bytes=round(estimated[1] - per_sample),
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
