"""The PNGs of FitResult.plot and MemoryProbeResult.plot: the figure's axes as documented (log
where values span decades, one x axis, B drawn above the micro-batch, every gap explained)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import autobatch
from autobatch import _plots


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plots would save (saved all the same)."""
    kept, save = [], _plots._save
    monkeypatch.setattr(_plots, "_save", lambda fig, path, plt: (kept.append(fig), save(fig, path, plt))[1])
    return kept


def test_gaps_and_decades_by_hand() -> None:
    assert _plots._gaps([1, 2, 3, 4, 5, 6], [True, True, False, True, False, True]) == [(1, 2), (4, 4), (6, 6)]
    assert _plots._spans_decades([1.0, 5.0, math.nan]) is False and _plots._spans_decades([0.01, 1.0]) is True
    assert _plots._smoothed([1.0, math.nan, 3.0, 5.0], 2) == [1.0, 1.0, 2.0, 4.0]


def test_the_fit_plot_has_one_x_axis_b_above_the_micro_batch_and_explains_its_gaps(
        regression, mse, tmp_path, figures) -> None:
    x, y = regression(n=1024, noise=3.0)
    result = autobatch.fit(nn.Linear(8, 1), (x, y), loss_fn=mse, val_data=(x[:128], y[:128]), lr=0.02, epochs=3,
                           initial_batch_size=16, decide_every=5, policy="gns", progress=False)
    path = result.plot(tmp_path / "fit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    loss, batch, noise, lr = fig.axes[:4]
    assert all(ax.get_shared_x_axes().joined(loss, ax) for ax in (batch, noise, lr))  # one x axis: the step
    assert lr.get_xlabel() == "optimizer step" and loss.child_axes[0].get_xlabel() == "examples seen"  # on top
    assert batch.get_yscale() == noise.get_yscale() == "log"
    b_line = next(line for line in batch.get_lines() if line.get_label() == "batch size B")
    micro = next(line for line in batch.get_lines() if line.get_label().startswith("micro-batch"))
    assert b_line.get_zorder() > micro.get_zorder() and micro.get_linestyle() == "None"  # dots under the line
    labels = [t.get_text() for t in noise.get_legend().get_texts()]
    assert "not yet measured\n(the estimator's first updates)" in labels  # the first steps have no estimate
    if any(math.isnan(r.noise_scale) for r in result.history if r.step > 20):
        assert any(t.startswith("no estimate: the averaged\n|G|^2 is <= 0") for t in labels)


def test_the_probe_plot_is_log_log_so_no_point_is_squashed(tmp_path, figures) -> None:
    batch = (torch.randn(4, 64), torch.randint(8, (4,)))
    probe = autobatch.probe_memory(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)), batch,
                                   nn.functional.cross_entropy, budget_bytes="4MiB", mode="estimate")
    assert max(probe.estimated) == 65_536  # the search's first look is at the cap: decades above the answer
    probe.plot(tmp_path / "probe.png")
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low < probe.limit_bytes / 2**20 < high and low < min(probe.estimated.values()) / 2**20
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"max micro-batch {probe.max_micro_batch_size:,}" in labels and "estimated peak (over the limit)" in labels
