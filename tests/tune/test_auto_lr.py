"""choose_base_lr (lr="auto") against a brute-force grid of plain fits, its bookkeeping (weights,
RNG, compute), and the trial objectives and schedule maths checked by hand."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import autobatch
from autobatch.registry import get_problem
from autobatch.tune.auto_lr import (
    DEFAULT_FRACTION,
    MIN_RUNG_STEPS,
    VAL_FRACTION,
    _lower_neighbour_second,
    _pick,
    choose_base_lr,
    default_lr_range,
    parabola_vertex,
    plan_rungs,
)
from autobatch.tune.objectives import score, tail_window

B0 = 16
EPOCHS = 8


@pytest.fixture(scope="module")
def ex():
    return get_problem("synthetic", num_train=1024, num_val=1024)


def _final_loss(ex, lr: float) -> float:
    """A plain adaptive-batch fit of the full budget at ``lr``, scored on the validation set."""
    try:
        result = autobatch.fit(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer, lr=lr,
                               epochs=EPOCHS, initial_batch_size=B0, progress=False)
    except FloatingPointError:
        return math.inf
    loss = ex.evaluate(result.model, ex.val_data)["val_loss"]
    return loss if math.isfinite(loss) else math.inf


@pytest.mark.slow
def test_chooses_an_lr_within_3x_of_the_brute_force_grid_and_restores_everything(ex):
    grid = np.logspace(-2, math.log10(2.0), 10)  # x1.8 apart
    losses = [_final_loss(ex, lr) for lr in grid]
    grid_lr = float(grid[int(np.argmin(losses))])

    model = ex.model_fn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    search = choose_base_lr(model, ex.train_data, loss_fn=ex.loss_fn, optimizer=ex.optimizer, epochs=EPOCHS,
                            config={"initial_batch_size": B0})

    assert grid_lr / 3 <= search.lr <= grid_lr * 3
    assert _final_loss(ex, search.lr) <= 1.5 * min(losses)
    # the model is back at its initial weights, and every RNG where it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    # compute: all trials together, within the documented fraction of the run's examples
    budget = EPOCHS * 1024
    assert search.run_samples == budget
    assert search.samples == sum(row.samples for row in search.trials)
    assert search.samples <= DEFAULT_FRACTION * budget and search.fraction == search.samples / budget
    # no val_data: a seeded tenth of the training data scored the trials
    assert search.held_out and search.val_examples == round(VAL_FRACTION * 1024)
    # the schedule: every candidate ran rung 0; survivors continued, each rung 4x longer,
    # the last at 1/8 of the run
    assert len(search.trials) == len(search.candidates) == search.survivors[0]
    assert search.rungs[-1] == budget // 8
    assert search.rungs == [budget // 8 // 4 ** (len(search.rungs) - 1 - k) for k in range(len(search.rungs))]
    assert search.rungs[0] >= MIN_RUNG_STEPS * B0
    complete = [row for row in search.trials if row.state == "COMPLETE"]
    assert len(complete) == search.survivors[-1]
    assert all(row.samples >= search.rungs[-1] for row in complete)
    assert all(row.reason and row.samples < search.rungs[-1] for row in search.trials if row.state == "PRUNED")


def test_given_val_data_scores_trials_on_it_and_trains_on_all_data(ex):
    model = ex.model_fn()
    search = choose_base_lr(model, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, optimizer=ex.optimizer,
                            max_samples=4096, config={"initial_batch_size": B0}, lr_range=(0.05, 0.8))
    assert not search.held_out and search.val_examples == 1024
    assert search.lr_range == (0.05, 0.8) and 0.05 <= search.lr <= 0.8
    assert search.samples <= 0.5 * 4096
    assert "complete" in search.table()


def test_an_adam_study_keeps_the_best_trial_and_its_lower_neighbour(ex):
    # AdamW on the synthetic problem: rung 0 ranks the LR above its best second, yet the
    # finalists are its best and the LR one grid step below (the study's intermediate values).
    def adamw(params, lr):
        return torch.optim.AdamW(params, lr=lr)

    search = choose_base_lr(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data,
                            optimizer=adamw, max_samples=8192, config={"initial_batch_size": B0},
                            lr_range=(3e-3, 0.3))
    assert len(search.rungs) == 2
    first = {t.params["lr"]: t.intermediate_values[search.rungs[0]] for t in search.study.trials}
    best, second = sorted(first, key=first.get)[:2]
    i = search.candidates.index(best)
    assert i > 0 and second != search.candidates[i - 1], "the case must tell the rule from plain ranking"
    finalists = {t.params["lr"]: t.intermediate_values[search.rungs[1]] for t in search.study.trials
                 if t.state.name == "COMPLETE"}
    assert set(finalists) == {best, search.candidates[i - 1]}
    winner = min(finalists, key=finalists.get)
    j = search.candidates.index(winner)
    assert search.lr == pytest.approx(math.sqrt(winner * search.candidates[j - 1])) and search.refined


def test_a_trial_is_the_start_of_the_run_it_is_for_budget_included():
    # A run bounded by max_steps only lets B follow the noise scale past 2 x B0; a run bounded
    # by examples does not. Each finished trial must match a direct fit with the run's own
    # limit, stopped at the trial's last rung, not a fit bounded by the rung's examples.
    noisy = get_problem("synthetic", num_train=4096, num_val=1024, noise_std=2.0)
    run = {"max_steps": 1600}
    search = choose_base_lr(noisy.model_fn(), noisy.train_data, loss_fn=noisy.loss_fn, val_data=noisy.val_data,
                            optimizer=noisy.optimizer, config={"initial_batch_size": B0}, lr_range=(0.02, 0.08),
                            **run)

    class Stop(autobatch.Callback):
        def on_step_end(self, record):
            if record.samples >= search.rungs[-1]:
                raise autobatch.StopTraining("rung")

    def direct(lr, **limits):
        result = autobatch.fit(noisy.model_fn(), noisy.train_data, loss_fn=noisy.loss_fn, optimizer=noisy.optimizer,
                               lr=lr, initial_batch_size=B0, progress=False, callbacks=[Stop()], **limits)
        return result.steps, result.history[-1].batch_size

    complete = [row for row in search.trials if row.state == "COMPLETE"]
    assert complete
    for row in complete:
        trial = (row.steps, row.final_batch_size)
        assert trial == direct(row.params["lr"], **run)
        assert trial != direct(row.params["lr"], max_samples=search.rungs[-1])  # the budget shows


def test_refuses_a_run_too_short_for_a_study_and_a_run_without_a_length(ex):
    with pytest.raises(ValueError, match=r"too short for lr='auto'.*pass an lr, or train longer"):
        choose_base_lr(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, max_steps=20,
                       config={"initial_batch_size": B0})
    with pytest.raises(ValueError, match=r"needs the run's length .* epochs, max_steps or max_samples.*"
                                         r"fraction must be in \(0, 1\] \(got fraction=2\)"):
        choose_base_lr(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, fraction=2)


def test_default_range_follows_the_optimizer_family(ex):
    assert default_lr_range(torch.optim.SGD) == (1e-3, 1.0)
    assert default_lr_range(ex.optimizer) == (1e-3, 1.0)  # a factory: probed on a dummy layer
    assert default_lr_range(lambda params, lr: torch.optim.AdamW(params, lr=lr)) == (1e-4, 1e-2)
    assert default_lr_range(torch.optim.Adam(ex.model_fn().parameters())) == (1e-4, 1e-2)


def test_tail_objective_by_hand():
    losses = [2.0, 1.0, 0.5, 0.7, 0.3, 0.9, 0.4, 0.6]
    assert tail_window(8) == 2 and tail_window(16) == 4 and tail_window(1) == 1
    assert score("tail", losses, 8) == pytest.approx(0.5)  # (0.4 + 0.6) / 2
    assert score("tail", losses, 16) == pytest.approx((0.9 + 0.4 + 0.6 + 0.3) / 4)
    assert score("tail", losses[:1], 8) == 2.0  # one evaluation so far
    assert score("final", losses, 8) == 0.6 and score("best", losses, 8) == 0.3
    with pytest.raises(ValueError, match=r"objective must be one of \('tail', 'final', 'best'\) \(got objective='mean'\)"):
        score("mean", losses, 8)


def test_schedule_and_parabola_by_hand():
    # Last rung 5000 examples; rungs 4x shorter before it keep a third (6, then 2 trials).
    # Cost n0 * 312 + 6 * (1250 - 312) + 2 * (5000 - 1250) = 312 n0 + 13128 <= 18000: n0 = 15.
    assert plan_rungs(18000, 5000, 21, 256) == ([312, 1250, 5000], [15, 6, 2])
    assert plan_rungs(18000, 5000, 9, 256) == ([312, 1250, 5000], [9, 6, 2])  # fewer wanted
    # rung 0 of 1055 // 4 = 263 < 512: rungs 2x apart keep half: 2 * 528 + 527 n0 <= 3796
    assert plan_rungs(3796, 1055, 14, 512) == ([527, 1055], [5, 2])
    # no earlier rung of 600 fits: a single rung of as many as fit (3200 // 1000)
    assert plan_rungs(3200, 1000, 5, 600) == ([1000], [3])
    assert plan_rungs(1000, 600, 5, 100) is None  # not even 2 candidates fit
    # two finalists that are grid neighbours: their geometric mean; otherwise the better one
    grid = [0.01, 0.04, 0.16, 0.64]
    finalists = [SimpleNamespace(lr=0.04, score=1.2), SimpleNamespace(lr=0.16, score=1.1)]
    assert _pick(finalists, grid) == (pytest.approx(0.08), True)
    assert _pick([finalists[0], SimpleNamespace(lr=0.64, score=1.5)], grid) == (0.04, False)
    # Adam-like: half a grid step below the winner, whoever else is there
    assert _pick(finalists, grid, adaptive=True) == (pytest.approx(0.08), True)
    lower_won = [SimpleNamespace(lr=0.04, score=1.0), SimpleNamespace(lr=0.16, score=1.1)]
    assert _pick(lower_won, grid, adaptive=True) == (pytest.approx(0.02), True)
    assert _pick([SimpleNamespace(lr=0.01, score=1.0), finalists[0]], grid, adaptive=True) == (0.01, False)
    rung = [SimpleNamespace(lr=lr, score=sc) for lr, sc in zip(grid, (3.0, 2.0, 1.0, 1.5))]
    assert _pick(rung, grid, adaptive=True) == (pytest.approx(0.08), True)  # not the parabola
    by_score = sorted(rung, key=lambda t: t.score)  # 0.16, 0.64, 0.04, 0.01
    assert [t.lr for t in _lower_neighbour_second(by_score, grid)] == [0.16, 0.04, 0.64, 0.01]
    rung[1].score = math.inf  # a diverged neighbour is not a finalist
    assert [t.lr for t in _lower_neighbour_second(sorted(rung, key=lambda t: t.score), grid)] == [0.16, 0.64, 0.01, 0.04]
    xs = [math.log(0.1), math.log(0.2), math.log(0.4)]
    ys = [(x - math.log(0.25)) ** 2 + 1.0 for x in xs]
    assert math.exp(parabola_vertex(xs, ys)) == pytest.approx(0.25)
    assert parabola_vertex(xs, [1.0, 2.0, 1.0]) is None  # bends down: no minimum


def test_a_resumed_run_reads_the_study_from_its_checkpoint(ex, tmp_path):
    from autobatch.train.checkpoint import save_checkpoint
    from autobatch.train.results import FitResult
    from autobatch.tune.auto_lr import resumed_search

    search = choose_base_lr(ex.model_fn(), ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data,
                            optimizer=ex.optimizer, max_samples=4096, config={"initial_batch_size": B0},
                            lr_range=(0.05, 0.8))
    assert resumed_search(tmp_path) is None and resumed_search(None) is None
    result = FitResult(model=ex.model_fn(), lr_search=search)
    save_checkpoint(tmp_path, {"result": result.model_dump(exclude={"model"})})  # what fit checkpoints
    again = resumed_search(tmp_path)
    assert again.lr == search.lr and again.trials == search.trials and again.samples == search.samples


def test_fit_with_lr_auto_runs_the_study_then_the_run_and_records_it(ex):
    # fit(lr="auto") = choose_base_lr on the same model and settings, then the full run from
    # the chosen LR: the same LR and the same trained weights as doing the two by hand.
    kwargs = dict(loss_fn=ex.loss_fn, val_data=ex.val_data, optimizer=ex.optimizer, epochs=4,
                  initial_batch_size=B0, progress=False)
    torch.manual_seed(0)
    auto = autobatch.fit(ex.model_fn(), ex.train_data, lr="auto", **kwargs)
    search = auto.lr_search
    assert search is not None and 0 < search.fraction <= search.max_fraction <= 0.5
    torch.manual_seed(0)
    model = ex.model_fn()
    by_hand = choose_base_lr(model, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data,
                             optimizer=ex.optimizer, epochs=4, config={"initial_batch_size": B0, "progress": False})
    assert by_hand.lr == search.lr
    manual = autobatch.fit(model, ex.train_data, lr=by_hand.lr, **kwargs)
    assert auto.final_metrics["val_loss"] == pytest.approx(manual.final_metrics["val_loss"], rel=1e-6)
    with pytest.raises(ValueError, match=r"lr must be a number > 0 or 'auto' \(got lr='fast'\)"):
        autobatch.fit(ex.model_fn(), ex.train_data, lr="fast", **kwargs)
    with pytest.raises(ValueError, match=r"lr='auto' to choose it"):
        autobatch.fit(ex.model_fn(), ex.train_data, optimizer=torch.optim.SGD,
                      **{k: v for k, v in kwargs.items() if k != "optimizer"})


def test_lr_auto_with_a_built_adamw_of_two_param_groups_keeps_each_groups_settings(ex):
    # The trials once rebuilt the instance as type(opt)(params, **opt.defaults): a TypeError
    # for AdamW, and one group's settings for all. Now each trial trains a copy of both groups
    # (the trial's LR is the first group's, the second keeps its 1/10 ratio), and the run the
    # user's own optimizer at the chosen LR.
    steps = []  # (optimizer id, [(lr, weight_decay) of each group]) at every optimizer step

    class Recorded(torch.optim.AdamW):
        def step(self, closure=None):
            steps.append((id(self), [(g["lr"], g["weight_decay"]) for g in self.param_groups]))
            return super().step(closure)

    model = ex.model_fn()
    opt = Recorded([{"params": [model.weight], "weight_decay": 0.1},
                    {"params": [model.bias], "lr": 1e-4, "weight_decay": 0.0}], lr=1e-3, betas=(0.8, 0.95))
    result = autobatch.fit(model, ex.train_data, loss_fn=ex.loss_fn, val_data=ex.val_data, optimizer=opt, lr="auto",
                           epochs=4, initial_batch_size=B0, policy="fixed", lr_scaling="none", progress=False)
    search = result.lr_search
    trials = [groups for owner, groups in steps if owner != id(opt)]
    run = [groups for owner, groups in steps if owner == id(opt)]
    assert trials and len(run) == result.steps and steps[-len(run):] == [(id(opt), g) for g in run]
    tried = set()
    for (lr0, wd0), (lr1, wd1) in trials:
        assert (wd0, wd1) == (0.1, 0.0) and lr1 == pytest.approx(lr0 / 10, rel=1e-12)
        tried.add(lr0)
    assert sorted(tried) == pytest.approx(search.candidates, rel=1e-12)  # every candidate trained
    for (lr0, wd0), (lr1, wd1) in run:
        assert (lr0, wd0, wd1) == (search.lr, 0.1, 0.0) and lr1 == pytest.approx(search.lr / 10, rel=1e-12)
    assert opt.param_groups[0]["betas"] == (0.8, 0.95) and result.history[0].lr == search.lr
