"""The PNGs of ``FitResult.plot`` and ``MemoryProbeResult.plot`` (matplotlib, imported here only).

Both follow the same rules: a log axis wherever the values span more than a decade (a linear
one squashes all but the largest), one x axis per figure, and every gap or special point said
in the legend rather than left to guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autobatch.memory.probe import MemoryProbeResult
    from autobatch.train.results import FitResult

__all__ = ["plot_fit", "plot_probe"]

_MIB = 2.0**20


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spans_decades(values: Sequence[float]) -> bool:
    """Whether the positive finite ``values`` span more than a factor of 10."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return bool(finite) and max(finite) > 10 * min(finite)


def _gaps(steps: Sequence[int], missing: Sequence[bool]) -> list[tuple[int, int]]:
    """``[(first, last), ...]``: the runs of consecutive steps where ``missing`` is True."""
    runs: list[tuple[int, int]] = []
    for step, gone in zip(steps, missing):
        if gone and runs and runs[-1][1] == step - 1:
            runs[-1] = (runs[-1][0], step)
        elif gone:
            runs.append((step, step))
    return runs


def _smoothed(values: Sequence[float], window: int) -> list[float]:
    """The running mean over the last ``window`` finite values (NaN until one is seen)."""
    out, held, total = [], [], 0.0
    for v in values:
        if math.isfinite(v):
            held.append(v)
            total += v
            if len(held) > window:
                total -= held.pop(0)
        out.append(total / len(held) if held else math.nan)
    return out


def plot_fit(result: FitResult, path: str | Path) -> Path:
    """Four panels over one x axis, the optimizer step (examples seen on the top axis): the
    loss, B and the micro-batch, the noise scale against B, and the LR."""
    plt = _pyplot()
    h = result.history
    steps = [r.step for r in h]
    fig, axes = plt.subplots(4, 1, figsize=(13, 11), sharex=True)
    if not h:
        axes[0].text(0.5, 0.5, "no step taken", ha="center", transform=axes[0].transAxes)
        return _save(fig, path, plt)

    # 1. loss: every step faint, its running mean over about an epoch's hundredth, evaluations
    ax = axes[0]
    losses = [r.train_loss for r in h]
    window = max(1, len(h) // 100)
    ax.plot(steps, losses, lw=0.5, alpha=0.35, color="C0", label="train loss (each step)")
    if window > 1:
        ax.plot(steps, _smoothed(losses, window), lw=1.4, color="C0", label=f"train loss\n(mean of {window} steps)")
    val = [(e["step"], e["val_loss"]) for e in result.evals if "val_loss" in e]
    if val:
        ax.plot(*zip(*val), "o-", color="C3", ms=4, label="val loss")
    ax.set(ylabel="loss", yscale="log" if _spans_decades(losses + [v for _, v in val]) else "linear")
    _legend(ax)
    _examples_axis(ax, h)

    # 2. B above the micro-batch: the split steps that measure the noise scale show as dots at B/2
    ax = axes[1]
    ax.plot(steps, [r.micro_batch_size for r in h], ".", ms=2, color="C1", alpha=0.5, zorder=2,
            label="micro-batch: a dot per step\n(at B/2: steps split in two\nto measure the noise scale)")
    ax.step(steps, [r.batch_size for r in h], where="post", lw=2, color="C0", zorder=3, label="batch size B")
    ax.set(ylabel="examples", yscale="log", title="batch size")
    ax.set_yscale("log", base=2)
    _legend(ax)

    # 3. the noise scale with its standard error, against B; no estimate: shaded and said why
    ax = axes[2]
    noise = [r.noise_scale for r in h]
    if all(math.isnan(v) for v in noise):
        ax.text(0.5, 0.5, "the noise scale was not measured (gns_method='off') or never ready",
                ha="center", va="center", transform=ax.transAxes)
    else:
        low = [max(v - r.noise_scale_stderr, v / 10) for v, r in zip(noise, h)]
        high = [v + r.noise_scale_stderr for v, r in zip(noise, h)]
        ax.fill_between(steps, low, high, color="C2", alpha=0.2, lw=0, label="noise scale\n+- 1 standard error")
        ax.plot(steps, noise, lw=1.0, color="C2", label="noise scale B_simple")
        gaps = _gaps(steps, [math.isnan(v) for v in noise])
        first_ready = next(s for s, v in zip(steps, noise) if not math.isnan(v))
        early = [g for g in gaps if g[0] < first_ready]
        later = [g for g in gaps if g[0] >= first_ready]
        for spans, colour, label in ((early, "0.85", "not yet measured\n(the estimator's first updates)"),
                                     (later, "C3", "no estimate: the averaged\n|G|^2 is <= 0 (noise swamps it)")):
            for i, (a, b) in enumerate(spans):
                ax.axvspan(a - 0.5, b + 0.5, color=colour, alpha=0.25 if colour == "C3" else 0.6, lw=0,
                           label=label if i == 0 else None)
    ax.step(steps, [r.batch_size for r in h], where="post", lw=1.2, color="C0", alpha=0.7, label="batch size B")
    ax.set(ylabel="examples", yscale="log", title="gradient noise scale B_simple = tr(Sigma) / |G|^2")
    _legend(ax)

    # 4. the LR the step used, and the base LR (the user's schedule) when the batch factor moved it
    ax = axes[3]
    lrs, base = [r.lr for r in h], [r.base_lr for r in h]
    ax.plot(steps, lrs, lw=1.2, color="C4", label="LR\n(base LR x batch factor)")
    if any(math.isfinite(b) and abs(b - lr) > 1e-12 * abs(b) for b, lr in zip(base, lrs)):
        ax.plot(steps, base, "--", lw=1.0, color="0.4", label="base LR\n(before the batch factor)")
    ax.set(ylabel="learning rate", yscale="log" if _spans_decades(lrs + base) else "linear", title="learning rate",
           xlabel="optimizer step")
    _legend(ax)
    return _save(fig, path, plt)


def _legend(ax: Any) -> None:
    """The legend beside the panel, where it hides no point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _examples_axis(ax: Any, history: Sequence[Any]) -> None:
    """A second x axis on top of ``ax``, ticked where the step axis is: the examples seen by
    then (not a second scale: B changes, so examples are not linear in steps)."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    steps = np.array([0] + [r.step for r in history], dtype=float)
    seen = np.array([0] + [r.samples for r in history], dtype=float)
    top = ax.secondary_xaxis("top")
    lo, hi = steps[0], steps[-1]
    top.set_xticks([t for t in ax.get_xticks() if lo <= t <= hi])
    top.xaxis.set_major_formatter(FuncFormatter(lambda s, _: f"{np.interp(s, steps, seen):,.0f}"))
    top.set_xlabel("examples seen")


def plot_probe(probe: MemoryProbeResult, path: str | Path) -> Path:
    """The step's peak memory against the micro-batch, both on log axes (the probe's sizes
    span decades: 1 to 65,536), with the budget, the limit and the answer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    sizes = sorted(probe.estimated)
    peaks = [probe.estimated[b] / _MIB for b in sizes]
    limit = probe.limit_bytes / _MIB
    fits = [(b, p) for b, p in zip(sizes, peaks) if p <= limit]
    over = [(b, p) for b, p in zip(sizes, peaks) if p > limit]
    ax.plot(sizes, peaks, "-", color="C0", lw=1, zorder=2)
    if fits:
        ax.plot(*zip(*fits), "o", color="C0", zorder=3, label="estimated peak (fits)")
    if over:
        ax.plot(*zip(*over), "x", color="C3", ms=8, zorder=3, label="estimated peak (over the limit)")
    real = sorted(b for b, v in probe.measured.items() if v is not None)
    if real:
        ax.plot(real, [probe.measured[b] / _MIB for b in real], "s", color="C1", mfc="none", ms=8, zorder=4,
                label="measured peak (real steps)")
    ax.axhline(probe.budget_bytes / _MIB, color="k", lw=1.2, label=f"budget {probe.budget_bytes / _MIB:,.0f} MiB")
    ax.axhline(limit, color="k", ls="--", lw=1, label=f"limit: budget x (1 - margin {probe.margin:g})")
    answer = probe.max_micro_batch_size
    ax.axvline(answer, color="C2", ls=":", lw=1.5,
               label=f"max micro-batch {answer:,}" + (" (the cap)" if probe.capped else ""))
    ax.plot([answer], [probe.peak_bytes_at_max / _MIB], "*", color="C2", ms=14, zorder=5,
            label=f"its peak {probe.peak_bytes_at_max / _MIB:,.1f} MiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="micro-batch size (examples)", ylabel="peak memory of a training step (MiB)",
           title=f"memory probe on {probe.device} ({probe.mode} mode)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
