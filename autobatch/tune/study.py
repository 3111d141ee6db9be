"""Hyperparameter studies with Optuna: find the base learning rate, resumably.

With an adaptive batch size the one number left to choose is the base LR at the base batch
``initial_batch_size`` (B0); the scaling rule carries it to every other B. :func:`tune_lr`
searches it on a log scale, one ``autobatch.fit`` run per Optuna trial; :func:`search` does
the same for any space of fit settings (momentum, weight decay, the noise-scale multiplier,
the policy...).

Every trial trains a fresh model from ``model_fn()`` on the same number of examples (the
trial length), with the adaptive batch size, and reports the validation loss ``n_evals`` times at
equal sample counts, so the pruner (MedianPruner with warm-up by default) stops hopeless
trials early. A trial whose loss stops being finite ends as *pruned*, the reason in its
``reason`` user attribute; it never stops the study.

Studies live in an Optuna storage, by default the SQLite file ``autobatch_studies.db`` in the
working directory: a second call with the same ``study_name`` resumes the study and adds
``n_trials`` more. Several processes may work on one study at once (give each its own
``seed``, or they propose the same first points); for many workers on one machine a
``optuna.storages.JournalStorage`` file avoids SQLite's write locks.

A trial whose process dies (killed, out of memory, power loss) would stay RUNNING forever.
Every trial records the host and PID of its process (:mod:`autobatch.tune._process`): when
the study resumes, a RUNNING trial of this host whose process is gone is marked FAIL at once
(``dead: its process (PID ...) is gone``). Trials of other hosts are left to the heartbeat:
trials opened from a database URL send one, and the trials whose heartbeat stopped more than
``GRACE_PERIOD_S`` (60 s) ago are marked FAIL, the table noting ``stale: process died``.
SIGTERM ends the trial in flight as FAIL (``terminated: SIGTERM``) and the process with
status 143, as it does ``fit`` (:mod:`autobatch.tune._signals`); Ctrl-C ends it as FAIL too.
An in-memory storage (None, ``InMemoryStorage``, ``sqlite://``) cannot be resumed: naming the
study there warns.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from autobatch._optional import import_pandas
from autobatch.config import FitConfig
from autobatch.data import as_batch_source
from autobatch.registry import make_pruner
from autobatch.train.distributed import setup_distributed
from autobatch.tune._process import fail_dead_trials, record_process
from autobatch.tune._signals import StudySignals
from autobatch.tune._trial import (
    ModelFactory,
    end_trials,
    follow_trials,
    is_in_memory,
    lead_trial,
    open_storage,
    run_trial,
    sampler_seed,
    stale_reason,
    writable,
)
from autobatch.tune.objectives import OBJECTIVES

__all__ = ["DEFAULT_STORAGE", "TrialRow", "TuneResult", "search", "tune_lr"]

DEFAULT_STORAGE = "sqlite:///autobatch_studies.db"
"""Where studies go unless told otherwise: a SQLite file in the working directory."""

TRIAL_UNITS = ("epochs", "samples")


class TrialRow(BaseModel):
    """One trial of a study, flattened for a table.

    Attributes:
        number: Optuna's trial number (unique within the study, across processes).
        state: ``"COMPLETE"``, ``"PRUNED"`` (by the pruner, or diverged), ``"FAIL"`` (an error,
            or its process died: see ``reason``), ``"RUNNING"``...
        value: the trial's score, its validation losses reduced by the study's objective
            (None unless complete).
        params: the sampled parameters, e.g. ``{"lr": 0.12}``.
        samples: examples the trial trained on before it ended (its cost).
        steps: optimizer steps it took.
        final_batch_size: the global batch size when it ended.
        reason: why it ended early (pruned at evaluation k, diverged: ..., dead: its process
            ... is gone, stale: process died, terminated: SIGTERM ..., interrupted: SIGINT
            ...), else None.
        wall_time_s: seconds its fit took.
    """

    model_config = ConfigDict(extra="forbid")

    number: int
    state: str
    value: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    samples: int | None = None
    steps: int | None = None
    final_batch_size: int | None = None
    reason: str | None = None
    wall_time_s: float | None = None


class TuneResult(BaseModel):
    """The outcome of :func:`tune_lr` or :func:`search`: the whole study so far, not only
    the trials of the last call.

    Attributes:
        study: the ``optuna.Study`` (its storage keeps it after the process ends).
        best_params: the parameters of the complete trial with the lowest validation loss
            (None when no trial completed).
        best_lr: ``best_params["lr"]``, the base LR at ``initial_batch_size``.
        best_value: its score (in the study objective's sense).
        trials: one :class:`TrialRow` per trial, by number.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    study: optuna.Study
    best_params: dict[str, Any] | None = None
    best_lr: float | None = None
    best_value: float | None = None
    trials: list[TrialRow] = Field(default_factory=list)

    @property
    def total_samples(self) -> int:
        """Examples trained on over all trials: the study's compute, in samples."""
        return sum(row.samples or 0 for row in self.trials)

    def table(self) -> str:
        """The trials as a fixed-width text table, one line each, the best marked ``*``."""
        names = sorted({name for row in self.trials for name in row.params})
        head = ["#", "state", *names, "val_loss", "samples", "steps", "B_end", "note"]
        lines = []
        for row in self.trials:
            best = "*" if self.best_value is not None and row.value == self.best_value else ""
            lines.append([
                f"{row.number}{best}", row.state.lower(),
                *[_fmt(row.params.get(name)) for name in names],
                _fmt(row.value), _fmt(row.samples), _fmt(row.steps), _fmt(row.final_batch_size),
                row.reason or "",
            ])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        rows = [head, *lines]
        return "\n".join(
            "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows
        )

    def to_pandas(self) -> Any:
        """The trials as a ``pandas.DataFrame``, one row per trial: ``number``, ``state``,
        ``value``, one column per sampled parameter (``lr``, ...), ``samples``, ``steps``,
        ``final_batch_size``, ``reason``, ``wall_time_s``.

        Raises:
            ImportError: without pandas (``pip install "torch-autobatch[pandas]"``).
        """
        pd = import_pandas("TuneResult.to_pandas")
        names = sorted({name for row in self.trials for name in row.params})
        rows = [{"number": row.number, "state": row.state, "value": row.value,
                 **{name: row.params.get(name) for name in names}, "samples": row.samples, "steps": row.steps,
                 "final_batch_size": row.final_batch_size, "reason": row.reason, "wall_time_s": row.wall_time_s}
                for row in self.trials]
        columns = ["number", "state", "value", *names, "samples", "steps", "final_batch_size", "reason", "wall_time_s"]
        return pd.DataFrame(rows, columns=columns)

    def plot(self, path: str | Path) -> Path:
        """Save the optimisation history and the loss against each parameter (LR on a log
        axis) side by side, drawn by ``optuna.visualization.matplotlib``; returns the path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            for draw in (ovm.plot_optimization_history, ovm.plot_slice):
                ax = draw(self.study)
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.set_size_inches(6.4, 4.8)
                fig.canvas.draw()
                images.append(fig.canvas.buffer_rgba())
                plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(12.8, 4.8), dpi=100)
        for ax, image in zip(axes, images):
            ax.imshow(image)
            ax.set_axis_off()
        fig.subplots_adjust(left=0, right=1, top=1, bottom=0, wspace=0)
        fig.savefig(path)
        plt.close(fig)
        return path


def tune_lr(
    model_fn: Callable[[], nn.Module],
    data: Any,
    *,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    val_data: Any,
    n_trials: int,
    trial_length: float,
    trial_unit: Literal["epochs", "samples"] = "epochs",
    lr_range: tuple[float, float] = (1e-5, 1.0),
    optimizer: Any = torch.optim.SGD,
    storage: str | optuna.storages.BaseStorage | None = DEFAULT_STORAGE,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: str | optuna.pruners.BasePruner | None = None,
    config: FitConfig | dict[str, Any] | None = None,
    seed: int | None = None,
    n_evals: int = 8,
    objective: Literal["tail", "final", "best"] = "tail",
    device: Any = None,
    verbose: bool = False,
    forward_loss: Callable[[nn.Module, Any], Any] | None = None,
    loss_items: Any = "auto",
) -> TuneResult | None:
    """Find the base learning rate (at ``initial_batch_size``) with an Optuna study.

    The LR is sampled log-uniformly from ``lr_range`` (TPE by default). Each trial runs
    :func:`autobatch.fit` with the adaptive batch size for ``trial_length`` and scores its
    validation losses (``objective``; lower is better).

    Args:
        model_fn: builds a fresh, freshly initialised model on every call.
        data: training data in any form :func:`autobatch.fit` takes.
        loss_fn: the batch protocol's loss, as in :func:`autobatch.fit` (optional for dict
            batches whose model returns ``.loss``), **mean-reduced** over the batch.
        val_data: held-out data; its mean loss is the objective.
        n_trials: trials this call adds to the study (>= 1).
        trial_length: the training length of every trial, in ``trial_unit``: ``"epochs"``
            (passes over ``data``, fractional allowed) or ``"samples"`` (examples
            processed). Every trial trains on the same number of examples; the adaptive
            batch decides how many optimizer steps that is.
        trial_unit: ``"epochs"`` or ``"samples"``.
        lr_range: ``(low, high)``, ``0 < low < high``: where the base LR is searched.
        optimizer: as for :func:`autobatch.fit`: a class or a factory ``f(params, lr)``.
        storage: an Optuna storage URL or object, or None (in memory). The default is a
            SQLite file in the working directory, so the study outlives the process; a
            database URL opens with the trial heartbeat, so trials of a dead process are
            marked FAIL on resume.
        study_name: a second call with the same name (and storage) resumes the study;
            None: ``"autobatch-tune-lr"`` (``"autobatch-search"`` for :func:`search`).
            Naming a study in an in-memory storage warns (it cannot be resumed).
        sampler: an Optuna sampler; None: TPE seeded by ``seed`` and the trials so far.
        pruner: ``"median"`` (the default: MedianPruner, 4 startup trials, warm-up over
            the first quarter of the evaluations), ``"hyperband"``, ``"none"``, or an
            ``optuna.pruners.BasePruner``.
        config: the :func:`autobatch.fit` settings shared by every trial (FitConfig or dict);
            ``initial_batch_size`` there is the batch the LR is tuned for.
        seed: seeds the default sampler, hashed with the number of trials already in the
            study, so that a resumed study draws new points and workers given different
            seeds never draw the same ones (not the model: ``model_fn`` owns its init).
        n_evals: validation evaluations per trial, at equal fractions of the trial length.
        objective: what a trial scores (:mod:`autobatch.tune.objectives`): ``"tail"`` (the
            default), the mean of its last evaluations (2 of 8), ``"final"``, the validation
            loss at the end of the trial, or ``"best"``, the lowest over its ``n_evals``
            evaluations (what early stopping would keep).
        device: passed to :func:`autobatch.fit`.
        verbose: keep Optuna's per-trial log lines (silenced by default).
        forward_loss, loss_items: the batch protocol's escape hatch and loss units, as in
            :func:`autobatch.fit` (used by every trial's fit and evaluation).

    Returns:
        A :class:`TuneResult`; ``best_value`` is in ``objective``'s sense, and ``best_lr``
        is None if no trial completed (all diverged or
        were pruned), with a warning. Under torchrun, rank 0 owns the study and returns the
        result; every trial is a data-parallel fit on all ranks (rank 0 sends the trial's
        parameters and its pruner's decisions), and the other ranks return None.

    Raises:
        ValueError: for invalid arguments (every one named at once, with the fix), a
            malformed storage URL, a storage that cannot be written (a read-only database),
            a study whose trial length differs from this one, or a ``model_fn`` that returns
            a model it returned before.
        Preempted: a ``SystemExit`` with status 143, after SIGTERM (the trial in flight
            marked FAIL).
    """
    problems = []
    low, high = _pair(lr_range, problems)
    if low is not None and high is not None:
        if not (math.isfinite(low) and math.isfinite(high) and low > 0 and high > 0):
            problems.append(
                f"lr_range must hold two positive finite LRs (got lr_range={tuple(lr_range)}); "
                "e.g. (1e-5, 1.0)"
            )
        elif low >= high:
            problems.append(
                f"lr_range must be (low, high) with low < high (got lr_range={tuple(lr_range)}); "
                f"swap them: lr_range=({high}, {low})"
            )

    def space(trial: optuna.Trial) -> dict[str, Any]:
        return {"lr": trial.suggest_float("lr", low, high, log=True)}

    return _study(
        model_fn, data, space=space, loss_fn=loss_fn, val_data=val_data, n_trials=n_trials,
        trial_length=trial_length, trial_unit=trial_unit, optimizer=optimizer, storage=storage,
        study_name=study_name or "autobatch-tune-lr", named=study_name is not None,
        sampler=sampler, pruner=pruner, config=config, seed=seed,
        n_evals=n_evals, objective=objective, device=device, verbose=verbose, problems=problems,
        protocol={"forward_loss": forward_loss, "loss_items": loss_items},
    )


def search(
    model_fn: Callable[[], nn.Module],
    data: Any,
    *,
    space: Callable[[optuna.Trial], dict[str, Any]],
    loss_fn: Callable[[Any, Any], Any] | None = None,
    val_data: Any,
    n_trials: int,
    trial_length: float,
    trial_unit: Literal["epochs", "samples"] = "epochs",
    optimizer: Any = torch.optim.SGD,
    storage: str | optuna.storages.BaseStorage | None = DEFAULT_STORAGE,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: str | optuna.pruners.BasePruner | None = None,
    config: FitConfig | dict[str, Any] | None = None,
    seed: int | None = None,
    n_evals: int = 8,
    objective: Literal["tail", "final", "best"] = "tail",
    device: Any = None,
    verbose: bool = False,
    forward_loss: Callable[[nn.Module, Any], Any] | None = None,
    loss_items: Any = "auto",
) -> TuneResult | None:
    """Search a user-given space of fit settings with the machinery of :func:`tune_lr`.

    ``space(trial)`` returns a dict; each key goes where its name says: ``"lr"`` (required)
    and ``"optimizer"`` to :func:`autobatch.fit`, any :class:`~autobatch.config.FitConfig`
    setting (``noise_multiplier``, ``policy``, ``lr_scaling``...) to the trial's config, and
    every other key (``momentum``, ``weight_decay``...) to the optimizer's constructor::

        def space(trial):
            return {
                "lr": trial.suggest_float("lr", 1e-3, 1.0, log=True),
                "momentum": trial.suggest_float("momentum", 0.0, 0.95),
                "noise_multiplier": trial.suggest_float("noise_multiplier", 0.5, 4.0, log=True),
            }

    The other arguments, the result and the errors are those of :func:`tune_lr`; ``best_lr``
    is the best trial's ``"lr"``.
    """
    return _study(
        model_fn, data, space=space, loss_fn=loss_fn, val_data=val_data, n_trials=n_trials,
        trial_length=trial_length, trial_unit=trial_unit, optimizer=optimizer, storage=storage,
        study_name=study_name or "autobatch-search", named=study_name is not None,
        sampler=sampler, pruner=pruner, config=config, seed=seed,
        n_evals=n_evals, objective=objective, device=device, verbose=verbose, problems=[],
        protocol={"forward_loss": forward_loss, "loss_items": loss_items},
    )


def _study(model_fn, data, *, space, loss_fn, val_data, n_trials, trial_length, trial_unit, optimizer,
           storage, study_name, named, sampler, pruner, config, seed, n_evals, objective, device,
           verbose, problems: list[str], protocol: dict[str, Any]) -> TuneResult | None:
    """Check everything, open or resume the study, run ``n_trials`` trials, summarise."""
    if not callable(model_fn):
        problems.append(f"model_fn must be a function that builds a model (got {type(model_fn).__name__})")
    if not callable(space):
        problems.append(f"space must be a function trial -> dict of settings (got {type(space).__name__})")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        problems.append(f"n_trials must be an integer >= 1 (got n_trials={n_trials!r})")
    if isinstance(n_evals, bool) or not isinstance(n_evals, int) or n_evals < 1:
        problems.append(f"n_evals must be an integer >= 1 (got n_evals={n_evals!r})")
    if objective not in OBJECTIVES:
        problems.append(f"objective must be one of {tuple(OBJECTIVES)} (got objective={objective!r})")
    if trial_unit not in TRIAL_UNITS:
        problems.append(f"trial_unit must be one of {TRIAL_UNITS} (got trial_unit={trial_unit!r})")
    numeric = isinstance(trial_length, (int, float)) and not isinstance(trial_length, bool)
    if not (numeric and math.isfinite(trial_length) and trial_length > 0):
        problems.append(f"trial_length must be a positive number of {trial_unit} (got trial_length={trial_length!r})")
    if val_data is None:
        problems.append("val_data is required: the validation loss is what the study minimises")
    if problems:
        raise ValueError("; ".join(problems))
    cfg = FitConfig.from_any(config, progress=False)
    check = protocol["forward_loss"] is None
    n = len(as_batch_source(data, check_items=check))
    val = as_batch_source(val_data, name="val_data", check_items=check)
    total = max(1, round(trial_length * n)) if trial_unit == "epochs" else int(trial_length)
    pruner = make_pruner(pruner, n_evals)
    comm_device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    info = setup_distributed(comm_device)
    make_model = ModelFactory(model_fn)

    signals = StudySignals()  # SIGTERM: the trial ends FAIL, the process exits 143

    def one_trial(trial: optuna.Trial) -> float:
        with signals.trial(trial):
            if info.is_main:
                record_process(trial)
            if info.enabled and info.is_main:
                lead_trial(trial, space, info, comm_device)
            return run_trial(trial, space=space, make_model=make_model, data=data, val=val,
                             loss_fn=loss_fn, optimizer=optimizer, config=cfg,
                             total_samples=total, n_evals=n_evals, device=device, objective=objective,
                             protocol=protocol)

    if not info.is_main:  # under torchrun: rank 0 owns the study, this rank follows its trials
        follow_trials(one_trial, info, comm_device)
        return None
    if named and is_in_memory(storage):
        warnings.warn(
            f"storage {storage!r} keeps study {study_name!r} in this process's memory: it is lost "
            "when the process ends and cannot be resumed; pass a database file such as "
            f"storage={DEFAULT_STORAGE!r} to keep it",
            stacklevel=3,
        )
    url = storage if isinstance(storage, str) else None
    storage = open_storage(storage)

    level = optuna.logging.get_verbosity()
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with writable(storage, url, study_name):
            study = optuna.create_study(storage=storage, study_name=study_name, direction="minimize",
                                        pruner=pruner, load_if_exists=True)
            _check_same_trials(study, total, n_evals, objective)
            # Optuna also does this before each trial; here too, so that the sampler seed
            # below and a table printed after n_trials already count the dead trials. A
            # trial whose process on this machine is gone needs no heartbeat to tell.
            _fail_stale_trials(study)
            fail_dead_trials(study)
        # Seeded by the seed and the trials already there: a resumed study does not replay
        # the random start-up points of the first call, and workers given different seeds
        # never share a sampler stream (a hash: seed + count collided, 1 + 1 = 2 + 0).
        study.sampler = sampler or optuna.samplers.TPESampler(
            seed=None if seed is None else sampler_seed(seed, len(study.trials)), n_startup_trials=5,
            multivariate=True,
        )
        with signals.installed(not info.enabled):  # under torchrun fit stops every rank alike
            try:
                study.optimize(one_trial, n_trials=n_trials, callbacks=[signals.after_trial])
            finally:
                end_trials(info)
    finally:
        optuna.logging.set_verbosity(level)
    return _summarise(study)


def _pair(lr_range: Any, problems: list[str]) -> tuple[float | None, float | None]:
    try:
        low, high = (float(x) for x in lr_range)
    except (TypeError, ValueError):
        problems.append(f"lr_range must be a pair (low, high) of positive LRs (got lr_range={lr_range!r})")
        return None, None
    return low, high


def _check_same_trials(study: optuna.Study, total_samples: int, n_evals: int, objective: str) -> None:
    """Refuse to mix trials of different lengths in one study: their losses do not compare."""
    want = {"autobatch_trial_samples": total_samples, "autobatch_n_evals": n_evals,
            "autobatch_objective": objective}
    have = {k: study.user_attrs[k] for k in want if k in study.user_attrs}
    clash = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
    if clash:
        detail = ", ".join(
            f"{k.removeprefix('autobatch_')}: study has {a}, this call {b}" for k, (a, b) in clash.items()
        )
        raise ValueError(
            f"study {study.study_name!r} was run with other trials ({detail}); losses after "
            "different trial lengths do not compare: use the same trial_length, n_evals and objective, or a "
            "new study_name"
        )
    for key, value in want.items():
        if key not in have:
            study.set_user_attr(key, value)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials whose heartbeat stopped (no-op without a heartbeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _summarise(study: optuna.Study) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    rows = [
        TrialRow(
            number=t.number, state=t.state.name, value=t.value if t.state.name == "COMPLETE" else None,
            params=dict(t.params), samples=t.user_attrs.get("samples"), steps=t.user_attrs.get("steps"),
            final_batch_size=t.user_attrs.get("final_batch_size"),
            reason=t.user_attrs.get("reason") or (stale_reason(study, t) if t.state.name == "FAIL" else None),
            wall_time_s=t.user_attrs.get("wall_time_s"),
        )
        for t in sorted(trials, key=lambda t: t.number)
    ]
    done = [t for t in trials
            if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not done:
        warnings.warn(
            f"no trial of study {study.study_name!r} completed ({len(trials)} trials: "
            f"{sum(r.reason is not None and r.reason.startswith('diverged') for r in rows)} diverged); "
            "lower or widen lr_range, or raise trial_length",
            stacklevel=3,
        )
        return TuneResult(study=study, trials=rows)
    best = min(done, key=lambda t: t.value)
    return TuneResult(study=study, best_params=dict(best.params), best_lr=best.params.get("lr"),
                      best_value=best.value, trials=rows)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
