"""The models people bring, with no glue code, through every entry point (issue 10).

Each case of :data:`autobatch.testing.USER_MODELS` is used the way its users have it: Hugging
Face GPT-2 and BERT from configs on a DataLoader of dict items padded per batch (no loss_fn:
the model's own ``.loss``), a two-input model on ``(X1, X2, y)``, a plain padded LM with tied
weights and ``ignore_index`` on ``(tokens, targets)`` items, a BatchNorm CNN, a GRU.
"""

from __future__ import annotations

import math

import pytest
import torch

import autobatch
import autobatch.evaluate
from autobatch.memory.probe import probe_memory
from autobatch.noise.measure import measure_noise_scale
from autobatch.noise.per_example import UnsupportedForPerExample, per_example_supported
from autobatch.testing import USER_MODELS

CASES = sorted(USER_MODELS)


pytestmark = pytest.mark.usefixtures("quiet_user_warnings")


def _kwargs(case) -> dict:
    return {"forward_loss": case.forward_loss, "loss_items": case.loss_items}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("bert_mlm", "batchnorm_cnn")
                                  else n for n in CASES])
def test_probe_memory_and_real_steps_agree(name: str) -> None:
    case = USER_MODELS[name]()
    # A budget that lands the answer near 24: the estimated peak at 24 (fake tensors).
    at_24 = probe_memory(case.model, case.data, case.loss_fn, forward_loss=case.forward_loss,
                         budget_bytes=2**40, max_micro_batch_size=24, margin=0, mode="estimate")
    probe = probe_memory(case.model, case.data, case.loss_fn, forward_loss=case.forward_loss,
                         budget_bytes=at_24.peak_bytes_at_max, max_micro_batch_size=64,
                         margin=0, mode="real")
    # Real steps (CPU, under a counted budget) confirm the fake-tensor estimate; the Hugging
    # Face models' attention takes a leaner kernel on real tensors than on fake ones.
    assert probe.max_micro_batch_size == 24
    assert probe.estimated[24] * 0.97 <= probe.measured[24] <= probe.estimated[24]
    assert probe.min_micro_batch_size == (2 if name == "batchnorm_cnn" else 1)


@pytest.mark.parametrize("name", CASES)
def test_measure_noise_scale_runs_and_equals_an_explicit_forward_loss(name: str) -> None:
    case = USER_MODELS[name]()
    kwargs = {"batch_size": 16, "num_batches": 12, "seed": 0, "loss_items": case.loss_items}
    est = measure_noise_scale(case.model, case.data, case.loss_fn, **kwargs)
    assert est.num_batches == 12 and math.isfinite(est.noise_scale) and est.trace_cov > 0
    # The same measurement with the protocol spelled out by hand as a forward_loss.
    if isinstance(case.data, tuple):
        def by_hand(model, batch):
            return case.loss_fn(model(*batch[:-1]), batch[-1])
    elif case.loss_fn is None:
        def by_hand(model, batch):
            return model(**batch).loss

        # the loss items by hand: GPT-2 predicts labels[t + 1] at t, BERT every label != -100
        shift = 1 if name == "gpt2" else 0
        kwargs["loss_items"] = lambda batch: (batch["labels"][:, shift:] != -100).sum()
    else:
        def by_hand(model, batch):
            return case.loss_fn(model(batch[0]), batch[1])
    assert measure_noise_scale(case.model, case.data, forward_loss=by_hand, **kwargs) == est


def test_per_example_mode_is_refused_cleanly_where_it_cannot_run() -> None:
    for name, reason in (("gru", "GRU"), ("gpt2", "tied weights"), ("padded_lm", "tied weights"),
                         ("batchnorm_cnn", "BatchNorm2d")):
        case = USER_MODELS[name]()
        assert reason in per_example_supported(case.model)
        with pytest.raises(UnsupportedForPerExample, match=reason):
            measure_noise_scale(case.model, case.data, case.loss_fn, batch_size=8,
                                method="per_example", loss_items=case.loss_items)
    two = USER_MODELS["two_input"]()
    assert per_example_supported(two.model) is None
    est = measure_noise_scale(two.model, two.data, two.loss_fn, batch_size=16, num_batches=4,
                              method="per_example", seed=0)
    assert math.isfinite(est.noise_scale)


@pytest.mark.parametrize("name", CASES)
def test_fit_trains_with_no_glue(name: str) -> None:
    case = USER_MODELS[name]()
    before = autobatch.evaluate.evaluate(case.model, case.data, case.loss_fn, loss_items=case.loss_items)
    result = autobatch.fit(case.model, case.data, loss_fn=case.loss_fn, val_data=case.data,
                           forward_loss=case.forward_loss, loss_items=case.loss_items,
                           optimizer=torch.optim.Adam, lr=3e-3, max_steps=30,
                           initial_batch_size=8, progress=False)
    assert len(result.history) == 30
    assert result.final_metrics["val_loss"] < before["val_loss"]


@pytest.mark.parametrize("name", CASES)
def test_tune_lr_runs_two_tiny_trials(name: str) -> None:
    import optuna

    case = USER_MODELS[name]()
    result = autobatch.tune_lr(lambda: USER_MODELS[name]().model, case.data, loss_fn=case.loss_fn,
                               val_data=case.data, n_trials=2, trial_length=0.5, lr_range=(1e-4, 1e-2),
                               optimizer=torch.optim.Adam, storage=optuna.storages.InMemoryStorage(),
                               config={"initial_batch_size": 8, "progress": False}, seed=0,
                               **_kwargs(case))
    assert result is not None and len(result.trials) == 2
