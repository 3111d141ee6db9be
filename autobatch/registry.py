"""Every plug-in a config, a call or the CLI may name by string, and how it is built.

Five families, each one readable dict from name to ``"module:attribute"`` (a class, or a
builder function where the thing built is not ours). Entries are imported on first use, so
this module imports nothing of autobatch's and ``import autobatch`` does not import optuna or a
problem's data set:

- :data:`POLICIES`: batch-size policies (:class:`~autobatch.policies.BatchSizePolicy`);
- :data:`LR_SCALINGS`: LR rules (:class:`~autobatch.scaling.LRScaling`);
- :data:`PRUNERS`: Optuna pruners for :mod:`autobatch.tune`, built from the reports per trial;
- :data:`PROBLEMS`: built-in problems (:mod:`autobatch.problems`);
- :data:`LOGGERS`: where a run's figures go while it runs (:class:`~autobatch.loggers.Logger`).

:func:`create` is the one "name or instance" lookup: a name builds its entry, an instance of
the family's base class is used as given, and anything else is an error that lists the names
of the dict (with a "did you mean"). :func:`from_config` builds a policy or LR rule from the
config sections: a class declares the settings its constructor takes (``config_settings``)
and what it needs of them (``check_settings``), so neither the plug-ins nor the config know
each other: :class:`autobatch.config.FitConfig` asks :func:`config_problems` and
:func:`default_lr_scaling` here.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from autobatch.policies.base import BatchSizePolicy
    from autobatch.problems import Problem
    from autobatch.scaling.base import LRScaling

__all__ = [
    "FAMILIES",
    "LOGGERS",
    "LR_SCALINGS",
    "POLICIES",
    "PROBLEMS",
    "PRUNERS",
    "check_spec",
    "config_problems",
    "create",
    "default_lr_scaling",
    "from_config",
    "get_problem",
    "lookup",
    "make_policy",
    "make_pruner",
    "make_scaling",
    "unknown_name",
]

POLICIES: dict[str, str] = {
    "budget": "autobatch.policies.budget:BudgetPolicy",
    "fixed": "autobatch.policies.fixed:FixedPolicy",
    "gns": "autobatch.policies.gns:GNSPolicy",
    "goodput": "autobatch.policies.goodput:GoodputPolicy",
    "measure": "autobatch.policies.measure:MeasurePolicy",
    "ramp": "autobatch.policies.ramp:RampPolicy",
    "schedule": "autobatch.policies.schedule:SchedulePolicy",
}

LR_SCALINGS: dict[str, str] = {
    "adascale": "autobatch.scaling.rules:AdaScaleScaling",
    "linear": "autobatch.scaling.rules:LinearScaling",
    "none": "autobatch.scaling.rules:NoScaling",
    "sqrt": "autobatch.scaling.rules:SqrtScaling",
}

# builder(n_evals) -> optuna pruner, where n_evals is the number of reports per trial
PRUNERS: dict[str, str] = {
    "halving": "autobatch.tune.pruners:halving",
    "hyperband": "autobatch.tune.pruners:hyperband",
    "median": "autobatch.tune.pruners:median",
    "none": "autobatch.tune.pruners:no_pruning",
}

# build(seed=0, **options) -> Problem
PROBLEMS: dict[str, str] = {
    "charlm": "autobatch.problems.charlm:build",
    "mnist1d": "autobatch.problems.mnist1d:build",
    "synthetic": "autobatch.problems.synthetic:build",
}


# cls(log_dir, append=...) -> Logger; append: a resumed run adds to its files
LOGGERS: dict[str, str] = {
    "csv": "autobatch.loggers.files:CSVLogger",
    "jsonl": "autobatch.loggers.files:JSONLLogger",
    "mlflow": "autobatch.loggers.mlflow:MLflowLogger",
    "tensorboard": "autobatch.loggers.tensorboard:TensorBoardLogger",
    "wandb": "autobatch.loggers.wandb:WandbLogger",
}


@dataclass(frozen=True)
class Family:
    """One plug-in family.

    Attributes:
        setting: the argument or setting that names a member (used in messages).
        entries: name -> ``"module:attribute"``.
        base: ``"module:Class"`` whose instances are used as given; None: names only.
        other_values: what else the setting accepts, for the error message.
    """

    setting: str
    entries: Mapping[str, str]
    base: str | None
    other_values: str


FAMILIES: dict[str, Family] = {
    "policy": Family("policy", POLICIES, "autobatch.policies.base:BatchSizePolicy",
                     "or a BatchSizePolicy instance"),
    "lr_scaling": Family("lr_scaling", LR_SCALINGS, "autobatch.scaling.base:LRScaling",
                         "None (the optimizer family's default), or an LRScaling instance"),
    "pruner": Family("pruner", PRUNERS, "optuna.pruners:BasePruner",
                     "None (median), or an optuna.pruners.BasePruner instance"),
    "problem": Family("problem", PROBLEMS, None,
                      "or build your own model and data and call autobatch.fit directly"),
    "logger": Family("logger", LOGGERS, "autobatch.loggers.base:Logger", "or an autobatch.loggers.Logger instance"),
}


def _load(ref: str) -> Any:
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def unknown_name(family: str, value: object) -> str:
    """The error message for ``value`` that names no member of ``family``: the allowed names
    from the family's dict, the other accepted values, and the closest name if any."""
    fam = FAMILIES[family]
    names = sorted(fam.entries)
    message = f"unknown {fam.setting} {value!r}; allowed: {', '.join(names)}, {fam.other_values}"
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.6) if isinstance(value, str) else []
    return message + (f"; did you mean {close[0]!r}?" if close else "")


def lookup(family: str, name: str) -> Any:
    """The class (or builder) registered as ``name`` in ``family``, imported now.

    Raises:
        ValueError: for a name not in the family's dict (see :func:`unknown_name`).
    """
    entries = FAMILIES[family].entries
    if not isinstance(name, str) or name not in entries:
        raise ValueError(unknown_name(family, name))
    return _load(entries[name])


def check_spec(family: str, spec: Any) -> Any:
    """``spec`` itself if it is a name in the family's dict or an instance of its base class.

    Imports the base class only for a value that is not a string.

    Raises:
        ValueError: otherwise (see :func:`unknown_name`).
    """
    fam = FAMILIES[family]
    if isinstance(spec, str) and spec in fam.entries:
        return spec
    if not isinstance(spec, str) and fam.base is not None and isinstance(spec, _load(fam.base)):
        return spec
    raise ValueError(unknown_name(family, spec))


def create(family: str, spec: Any, /, **kwargs: Any) -> Any:
    """A member of ``family`` from a name (built with ``kwargs``) or an instance (as given).

    Args:
        family: a key of :data:`FAMILIES` (``"policy"``, ``"lr_scaling"``, ``"pruner"``,
            ``"problem"``, ``"logger"``).
        spec: a name from the family's dict, or an instance of its base class.
        **kwargs: keyword arguments of the class or builder (ignored for an instance).

    Raises:
        ValueError: for an unknown name or a keyword the class or builder does not take; both
            messages list the allowed values.
    """
    fam = FAMILIES[family]
    if not isinstance(check_spec(family, spec), str):
        return spec
    target = lookup(family, spec)
    params = inspect.signature(target).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {fam.setting} {spec!r}; allowed options: {allowed}"
            )
    return target(**kwargs)


def _settings(sections: tuple[Any, ...]) -> dict[str, Any]:
    """Flat setting name -> value over config sections (pydantic models or mappings)."""
    flat: dict[str, Any] = {}
    for section in sections:
        flat.update(section if isinstance(section, Mapping) else vars(section))
    return flat


def _keywords(cls: type, settings: Mapping[str, Any]) -> dict[str, Any]:
    wanted = getattr(cls, "config_settings", {})
    return {keyword: settings[name] for keyword, name in wanted.items() if name in settings}


def from_config(family: str, spec: Any, *sections: Any) -> Any:
    """A policy or LR rule built from config sections, or an instance as given.

    A class reads the settings named in its ``config_settings`` (constructor keyword ->
    setting name) from the sections.

    Args:
        family: ``"policy"`` or ``"lr_scaling"``.
        spec: a name from the family's dict, or an instance.
        *sections: config sections (e.g. ``cfg.batch, cfg.lr``) or flat mappings of settings.
    """
    if not isinstance(spec, str):
        return create(family, spec)
    return create(family, spec, **_keywords(lookup(family, spec), _settings(sections)))


def config_problems(family: str, spec: Any, settings: Mapping[str, Any]) -> dict[str, str]:
    """What the named plug-in needs of the config that ``settings`` does not give.

    Asks the class's ``check_settings`` with the settings it is built from.

    Args:
        family: ``"policy"`` or ``"lr_scaling"``.
        spec: the config's value: a name (checked), or an instance or unknown name (nothing
            to check: an instance was checked when it was built, an unknown name is reported
            by the config's own validator).
        settings: flat setting name -> value; a plug-in whose settings are not all there
            is not judged.

    Returns:
        Setting name -> message (empty when all is well), each message prefixed by the
        plug-in's setting, e.g. ``"policy='ramp': RampPolicy needs lr_milestones ..."``.
    """
    if not isinstance(spec, str) or spec not in FAMILIES[family].entries:
        return {}
    cls = lookup(family, spec)
    check = getattr(cls, "check_settings", None)
    names = getattr(cls, "config_settings", {})
    if check is None or any(name not in settings for name in names.values()):
        return {}  # settings it cannot see (their section is invalid) are not judged
    problems = check(**_keywords(cls, settings))
    return {names.get(k, k): f"{FAMILIES[family].setting}={spec!r}: {m}" for k, m in problems.items()}


def default_lr_scaling(policy: Any) -> str | None:
    """The LR rule a policy asks for when the config names none (its class's
    ``default_lr_scaling``), or None for the optimizer family's default."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            return None  # the config reports the unknown name
        policy = lookup("policy", policy)
    cls = policy if isinstance(policy, type) else type(policy)
    return getattr(cls, "default_lr_scaling", None)


# -- the names each family had before the registry (thin wrappers, same signatures) ----------
def make_policy(name_or_instance: str | BatchSizePolicy, config: Any, lr_config: Any) -> BatchSizePolicy:
    """A policy from a name in :data:`POLICIES`, built from the ``batch`` and ``lr`` config
    sections, or an instance (returned as is).

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
    """
    return from_config("policy", name_or_instance, config, lr_config)


def make_scaling(name_or_instance: str | LRScaling) -> LRScaling:
    """An LR rule from a name in :data:`LR_SCALINGS` or an instance (returned as is).

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
    """
    return create("lr_scaling", name_or_instance)


def make_pruner(pruner: str | optuna.pruners.BasePruner | None, n_evals: int) -> optuna.pruners.BasePruner:
    """An Optuna pruner from a name in :data:`PRUNERS` (built for ``n_evals`` reports per
    trial), an instance (returned as is) or None (median). Imports optuna.

    Raises:
        ValueError: for an unknown name (the message lists the allowed ones).
    """
    return create("pruner", "median" if pruner is None else pruner, n_evals=n_evals)


def get_problem(name: str, seed: int = 0, **options: Any) -> Problem:
    """Build the built-in problem registered as ``name`` in :data:`PROBLEMS`.

    Args:
        name: one of :data:`PROBLEMS`.
        seed: seeds the model initialisation (not the data).
        **options: the example's own keyword options (see each module's ``build``).

    Raises:
        ValueError: for an unknown name or option, listing the allowed ones.
    """
    return create("problem", name, seed=seed, **options)
