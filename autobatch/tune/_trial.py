"""The plumbing behind :mod:`autobatch.tune`: one Optuna trial as one ``autobatch.fit`` run.

Kept apart from the public functions so :mod:`autobatch.tune` reads as the API and its
checks. Here: opening a storage, the model factory guard, and the
objective with its reporting callback.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import torch
from torch import nn

from autobatch.config import FitConfig, _flat_keys
from autobatch.data import BatchSource
from autobatch.evaluate import evaluate
from autobatch.train.callbacks import Callback
from autobatch.train.distributed import DistInfo, broadcast_int
from autobatch.train.loop import train
from autobatch.tune.objectives import DEFAULT_OBJECTIVE, score

# Keyword arguments of autobatch.fit a search space may set; every other key is either a
# FitConfig setting or an optimizer argument.
FIT_KEYS = ("lr", "optimizer")


# Heartbeat of trials in database storages: a running trial's process writes a timestamp
# every HEARTBEAT_INTERVAL_S seconds (from a thread, so a long step does not delay it), and a
# RUNNING trial whose last one is older than GRACE_PERIOD_S belongs to a dead process: the next
# process to start a trial of the study marks it FAIL. The grace period covers a live process
# whose write waits on another's SQLite lock; it is how long a killed trial may still show as
# running. Integers: Optuna counts both in whole seconds.
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 60

# Study user attribute naming a trial marked FAIL for a stale heartbeat (a finished trial's
# own attributes can no longer be written, the study's can).
_STALE_KEY = "autobatch_stale_trial_{number}"


def open_storage(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    """An Optuna storage from a database URL, a storage object (returned as is) or None
    (a fresh in-memory storage).

    A database URL opens with the trial heartbeat on (:data:`HEARTBEAT_INTERVAL_S`,
    :data:`GRACE_PERIOD_S`), so the trials of a process that died are marked FAIL when the
    study resumes; an in-memory SQLite URL (``sqlite://``) opens without it (nothing can
    resume it). A storage object keeps its own heartbeat settings: pass
    ``optuna.storages.RDBStorage(url, heartbeat_interval=..., grace_period=...)`` to have one.

    Raises:
        ValueError: for a string that is not a URL Optuna can open, naming the fix.
        TypeError: for anything else.
    """
    if storage is None:
        return optuna.storages.InMemoryStorage()
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    if not isinstance(storage, str):
        raise TypeError(
            f"storage must be an Optuna storage URL or an optuna.storages.BaseStorage "
            f"(got {type(storage).__name__})"
        )
    hint = (
        "give a database URL such as 'sqlite:///autobatch_studies.db', or a storage object "
        "such as optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))"
    )
    if "://" not in storage:
        raise ValueError(f"storage {storage!r} is not a URL (no '://'); {hint}")
    from sqlalchemy.exc import IntegrityError, OperationalError

    # In-memory SQLite is one database per connection, and the heartbeat thread has its own.
    heartbeat = {} if is_in_memory(storage) else {
        "heartbeat_interval": HEARTBEAT_INTERVAL_S, "grace_period": GRACE_PERIOD_S,
        "heartbeat_stale_trial_callback": _note_stale_trial,
    }
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, **heartbeat)
        except (IntegrityError, OperationalError) as err:
            # Two processes opening a new database at once race to create its tables; the
            # loser sees "table ... already exists" and succeeds on a second try.
            last = err
            time.sleep(0.1 * (attempt + 1))
        except Exception as err:  # sqlalchemy raises several types for a bad URL
            last = err
            break
    raise ValueError(f"cannot open storage {storage!r} ({type(last).__name__}: {last}); {hint}") from last


@contextlib.contextmanager
def writable(storage: optuna.storages.BaseStorage, url: str | None, study_name: str) -> Iterator[None]:
    """Turn a storage that refuses to be written (a read-only database file or folder, a full
    disk) into a ValueError naming the storage, the database's own reason and the fix.

    Raises:
        ValueError: from Optuna's ``StorageInternalError`` or a database ``OperationalError``.
    """
    from sqlalchemy.exc import OperationalError

    try:
        yield
    except (optuna.exceptions.StorageInternalError, OperationalError) as err:
        cause: BaseException = err
        while cause.__cause__ is not None:  # the database's own words, e.g. "attempt to write a readonly database"
            cause = cause.__cause__
        where = repr(url) if url is not None else type(storage).__name__
        raise ValueError(
            f"cannot write study {study_name!r} to storage {where} ({type(cause).__name__}: "
            f"{' '.join(str(cause).split())}); make the database file and its folder writable, or pass another "
            "storage such as 'sqlite:///autobatch_studies.db' in a folder you can write"
        ) from err


def sampler_seed(seed: int, trials: int) -> int:
    """The default sampler's seed for a process given ``seed`` that finds ``trials`` trials in
    the study: a 32-bit hash of both. Another call (more trials) draws other points, and two
    processes given different seeds draw different ones whenever each starts (``seed +
    trials`` gave seed 1 after one trial the stream of seed 2 at none)."""
    digest = hashlib.blake2b(f"{seed}:{trials}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def is_in_memory(storage: str | optuna.storages.BaseStorage | None) -> bool:
    """Whether ``storage`` keeps its studies in this process's memory only: None, an
    ``InMemoryStorage``, or an in-memory SQLite URL (``sqlite://``, ``sqlite:///:memory:``)."""
    if storage is None or isinstance(storage, optuna.storages.InMemoryStorage):
        return True
    if not isinstance(storage, str):
        return False
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
    except (ArgumentError, ValueError):
        return False  # malformed: open_storage says so
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _note_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's callback for a trial it just marked FAIL because its heartbeat stopped."""
    study.set_user_attr(
        _STALE_KEY.format(number=trial.number),
        f"stale: process died (no heartbeat for > {GRACE_PERIOD_S} s); marked FAIL on resume",
    )


def stale_reason(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
    """Why ``trial`` failed as stale (its process died mid-trial), or None if it did not."""
    return study.user_attrs.get(_STALE_KEY.format(number=trial.number))


class ModelFactory:
    """Calls ``model_fn`` and refuses a model (or a parameter) it has already handed out.

    A model reused across trials would start every trial but the first from the weights
    the previous trial trained, and the comparison between learning rates would be void.
    Objects are remembered by id with a weak reference, so an id reused after the study
    dropped a model is not mistaken for it (and tensors are never compared with ``==``).
    """

    def __init__(self, model_fn: Callable[[], nn.Module]) -> None:
        self.model_fn = model_fn
        self._seen: dict[int, weakref.ref] = {}

    def _known(self, obj: Any) -> bool:
        ref = self._seen.get(id(obj))
        return ref is not None and ref() is obj

    def __call__(self) -> nn.Module:
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model_fn must return a torch.nn.Module (got {type(model).__name__}); "
                "pass a function that builds the model, e.g. model_fn=lambda: MyNet()"
            )
        if self._known(model):
            raise ValueError(
                f"model_fn returned the same {type(model).__name__} object twice (id "
                f"{id(model):#x}); every trial needs a freshly initialised model: build it "
                "inside model_fn, e.g. model_fn=lambda: MyNet(), not model_fn=lambda: net"
            )
        shared = [name for name, p in model.named_parameters() if self._known(p)]
        if shared:
            raise ValueError(
                f"model_fn returned a model whose parameters {shared[:3]} belong to a model "
                "it built before; every trial needs fresh parameters: create the layers "
                "inside model_fn"
            )
        for obj in (model, *model.parameters()):
            self._seen[id(obj)] = weakref.ref(obj)
        return model


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a search space's dict into (fit keyword args, FitConfig settings, optimizer kwargs)."""
    if not isinstance(overrides, dict):
        raise TypeError(
            f"space(trial) must return a dict of settings (got {type(overrides).__name__}), "
            "e.g. {'lr': trial.suggest_float('lr', 1e-4, 1, log=True)}"
        )
    config_keys = _flat_keys()
    fit_kw = {k: v for k, v in overrides.items() if k in FIT_KEYS}
    config = {k: v for k, v in overrides.items() if k in config_keys}
    optim = {k: v for k, v in overrides.items() if k not in fit_kw and k not in config}
    return fit_kw, config, optim


def with_kwargs(optimizer: Any, kwargs: dict[str, Any]) -> Any:
    """The optimizer spec of :func:`autobatch.fit`, with extra constructor arguments bound.

    Raises:
        ValueError: for a key the optimizer does not take (a misspelt setting, usually).
    """
    if not kwargs:
        return optimizer
    try:
        params = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            name = getattr(optimizer, "__name__", type(optimizer).__name__)
            raise ValueError(
                f"space(trial) returned {unknown}, which is neither an autobatch.fit argument "
                f"{list(FIT_KEYS)}, a FitConfig setting, nor an argument of the optimizer {name} "
                f"({', '.join(p for p in params if p not in ('self', 'params'))}); fix the name "
                "or pass an optimizer that takes it"
            )
    if isinstance(optimizer, type):
        return lambda params, lr: optimizer(params, lr=lr, **kwargs)
    return lambda params, lr: optimizer(params, lr, **kwargs)


class TrialReporter(Callback):
    """Evaluates at fixed sample counts, reports ``val_loss`` to the trial, prunes.

    The reports are indexed 1..n by evaluation (not by optimizer step), at the same numbers
    of examples processed in every trial, so a pruner compares trials at equal cost however
    their batch sizes evolved. Each report is the trial's score so far under ``objective``
    (:mod:`autobatch.tune.objectives`), computed from the losses measured up to that mark.
    """

    def __init__(self, trial: optuna.Trial, val: BatchSource, loss_fn: Callable, marks: list[int],
                 device: Any, objective: str = DEFAULT_OBJECTIVE) -> None:
        self.trial, self.val, self.loss_fn, self.marks, self.device = trial, val, loss_fn, marks, device
        self.objective = objective
        self.protocol: dict[str, Any] = {}  # forward_loss, loss_items: as given to fit
        self.model: nn.Module | None = None
        self.next = 0  # index into marks of the next evaluation
        self.samples = self.steps = self.batch_size = 0
        self.value = math.nan
        self.losses: list[float] = []  # every validation loss measured, oldest first
        self.reported = 0  # the last report's index (1-based), 0 before the first

    def on_step_end(self, record) -> None:
        self.samples, self.steps, self.batch_size = record.samples, record.step, record.batch_size
        passed = self.next
        while passed < len(self.marks) and record.samples >= self.marks[passed]:
            passed += 1
        if passed == self.next:
            return
        self.next = passed
        self.report(passed)

    def report(self, index: int) -> None:
        """Evaluate, report as evaluation ``index`` (1-based) and let the pruner decide."""
        assert self.model is not None
        value = evaluate(self.model, self.val, self.loss_fn, device=self.device, **self.protocol)["val_loss"]
        if not math.isfinite(value):
            raise Diverged(f"val_loss={value} at evaluation {index} ({self.samples} examples)")
        self.losses.append(value)
        self.value = score(self.objective, self.losses, len(self.marks))
        self.trial.report(self.value, index)
        self.reported = index
        if self.trial.should_prune():
            self.trial.set_user_attr(
                "reason", f"pruned at evaluation {index}/{len(self.marks)} (val_loss={self.value:.4g})"
            )
            raise optuna.TrialPruned()


class Diverged(Exception):
    """A trial's validation loss or training loss stopped being finite."""


def run_trial(trial: optuna.Trial, *, space: Callable[[optuna.Trial], dict[str, Any]],
              make_model: ModelFactory, data: Any, val: BatchSource, loss_fn: Callable,
              optimizer: Any, config: FitConfig, total_samples: int, n_evals: int,
              device: Any, objective: str = DEFAULT_OBJECTIVE, protocol: dict[str, Any] | None = None) -> float:
    """The objective: one adaptive-batch fit of ``total_samples`` examples (``protocol``:
    ``forward_loss`` and ``loss_items``, passed to fit and to every evaluation).

    Returns the trial's score under ``objective`` (:mod:`autobatch.tune.objectives`) over its
    ``n_evals`` validation losses. Divergence ends the trial as pruned, its reason in the
    ``reason`` user attr, with a NaN report after the last good one (TPE then ranks it below
    every trial that reached as far).
    """
    fit_kw, settings, optim_kw = split_overrides(space(trial))
    if "lr" not in fit_kw:
        raise ValueError(
            f"space(trial) must set 'lr' (got keys {sorted([*fit_kw, *settings, *optim_kw])}); "
            "add e.g. 'lr': trial.suggest_float('lr', 1e-4, 1.0, log=True)"
        )
    marks = [math.ceil(total_samples * k / n_evals) for k in range(1, n_evals + 1)]
    reporter = TrialReporter(trial, val, loss_fn, marks, device, objective)
    reporter.model = model = make_model()
    reporter.protocol = dict(protocol or {})
    cfg = FitConfig.from_any(config, **settings)
    start = time.perf_counter()
    try:
        opt = with_kwargs(fit_kw.get("optimizer", optimizer), optim_kw)
        train(model, data, loss_fn=loss_fn, optimizer=opt, lr=fit_kw["lr"], max_samples=total_samples,
            config=cfg, callbacks=[reporter], device=device, **reporter.protocol)
        if reporter.reported < n_evals:  # a fit that stopped short of the last mark
            reporter.report(n_evals)
    except (FloatingPointError, Diverged) as err:
        trial.set_user_attr("reason", f"diverged: {err}")
        trial.set_user_attr("diverged", True)
        trial.report(math.nan, reporter.reported + 1)
        raise optuna.TrialPruned(f"diverged: {err}") from None
    finally:
        trial.set_user_attr("samples", reporter.samples)
        trial.set_user_attr("steps", reporter.steps)
        trial.set_user_attr("final_batch_size", reporter.batch_size)
        trial.set_user_attr("wall_time_s", round(time.perf_counter() - start, 3))
    return reporter.value


# -- data-parallel studies -------------------------------------------------------------------
# Under torchrun, rank 0 owns the study (its storage, sampler and pruner); every trial is one
# data-parallel fit on all ranks. Rank 0 sends each trial's parameters to the others before
# the fit, and its pruner's decision at every report, so all ranks stop a trial together.


class FollowerTrial(optuna.trial.FixedTrial):
    """A non-zero rank's view of rank 0's trial: the same parameters (a search space called
    with it suggests exactly rank 0's values) and rank 0's prune decisions."""

    def __init__(self, params: dict[str, Any], info: DistInfo, device: torch.device) -> None:
        super().__init__(params)
        self._info, self._device = info, device

    def should_prune(self) -> bool:
        return bool(broadcast_int(0, self._info, self._device))


def lead_trial(trial: optuna.Trial, space: Callable, info: DistInfo, device: torch.device) -> None:
    """On rank 0: draw the trial's parameters, send them to every rank, and make the trial's
    prune decisions reach them too."""
    space(trial)  # suggests the parameters; run_trial's second call gets the same values
    torch.distributed.broadcast_object_list([dict(trial.params)], src=0)
    decide = trial.should_prune
    trial.should_prune = lambda: bool(broadcast_int(int(decide()), info, device))  # type: ignore[method-assign]


def follow_trials(run: Callable[[optuna.Trial], float], info: DistInfo, device: torch.device) -> int:
    """On ranks other than 0: run every trial rank 0 announces until it announces the end.

    Returns:
        The number of trials this rank took part in.
    """
    count = 0
    while True:
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is None:
            return count
        count += 1
        try:
            run(FollowerTrial(box[0], info, device))
        except optuna.TrialPruned:
            pass  # rank 0 records the outcome; this rank only took part


def end_trials(info: DistInfo) -> None:
    """On rank 0: tell the other ranks the study is over."""
    if info.enabled:
        torch.distributed.broadcast_object_list([None], src=0)
