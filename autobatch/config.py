"""The configuration of :func:`autobatch.fit`: pydantic models, one per concern.

:class:`FitConfig` groups six sections (``batch``, ``lr``, ``estimator``, ``memory``,
``data``, ``log``). Every field name is unique across sections, so a setting can be given
flat, without its section: ``FitConfig.from_any(None, policy="goodput", max_batch_size=512)``
sets ``batch.policy`` and ``batch.max_batch_size``. All models forbid unknown fields, and
pydantic reports every invalid field of one call at once.

Conventions: batch sizes are *global* (examples per optimizer step, all micro-batches of the
step together) unless the name says ``micro``; memory sizes are bytes; ``lr_milestones`` are
epochs; ``decide_every``, ``warmup_steps`` and ``eval_every`` count optimizer steps.

Plug-ins are named through :mod:`autobatch.registry`, which this module asks for the allowed
names and for what a named plug-in needs of the other settings; it imports no plug-in.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from autobatch.registry import check_spec, config_problems, default_lr_scaling

__all__ = [
    "BatchConfig",
    "DataConfig",
    "EstimatorConfig",
    "FitConfig",
    "LRConfig",
    "LogConfig",
    "MemoryConfig",
    "parse_bytes",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BatchConfig(_Section):
    """How the global batch size starts, where it may go and how it is chosen.

    Attributes:
        initial_batch_size: ``B0``, the first global batch size and the base batch at which
            the base learning rate is tuned (LR scaling rules map the LR from ``B0``).
        min_batch_size: smallest global batch a policy may pick; ``None`` means
            ``initial_batch_size``.
        max_batch_size: largest global batch a policy may pick; ``None`` means the size of
            the training set (resolved by ``fit``).
        policy: the batch-size policy, a name from :data:`autobatch.registry.POLICIES`
            (``"budget"``, the default, ``"gns"``, ``"goodput"``, ``"ramp"``, ``"fixed"``, or
            ``"measure"``: B0 and the base LR kept, the noise scale only measured) or a
            :class:`~autobatch.policies.BatchSizePolicy` instance (not JSON-serialisable).
            A named policy may need other settings (``"ramp"`` needs ``lr_milestones``).
        decide_every: optimizer steps between two batch-size decisions.
        max_growth: largest factor by which one decision may grow (or shrink) the batch.
        hysteresis: the batch changes only if the proposal differs from the current size
            by more than this fraction of it (0.05: 5%), so it does not thrash.
        noise_multiplier: the ``gns`` policy targets ``noise_multiplier x B_simple``.
        noise_confidence: the ``gns`` policy moves only when B lies outside the noise
            scale's interval of this many standard errors (0: follow the average).
        round_to: batch sizes above ``round_to`` are rounded to a multiple of it.
    """

    initial_batch_size: int = Field(32, ge=1)
    min_batch_size: int | None = Field(None, ge=1)
    max_batch_size: int | None = Field(None, ge=1, validate_default=True)
    # Any: the registry checks names and instances, so this module imports no plug-in.
    policy: Any = "budget"
    decide_every: int = Field(10, ge=1)
    max_growth: float = Field(2.0, gt=1.0)
    hysteresis: float = Field(0.05, ge=0.0, lt=1.0)
    noise_multiplier: float = Field(1.0, gt=0.0)
    noise_confidence: float = Field(1.0, ge=0.0)
    round_to: int = Field(8, ge=1)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: Any) -> Any:
        return check_spec("policy", value)

    # A field validator rather than a model validator, so that bad bounds are reported
    # together with every other invalid field. It runs last of the three (declaration order,
    # validate_default so it runs when max_batch_size is left None) and sees the other two in
    # info.data when they are valid.
    @field_validator("max_batch_size")
    @classmethod
    def _ordered_bounds(cls, hi: int | None, info: ValidationInfo) -> int | None:
        b0, lo = info.data.get("initial_batch_size"), info.data.get("min_batch_size")
        problems = []
        if lo is not None and b0 is not None and lo > b0:
            problems.append(
                f"min_batch_size must be <= initial_batch_size (got min_batch_size={lo}, "
                f"initial_batch_size={b0}); lower min_batch_size or raise initial_batch_size"
            )
        if hi is not None and b0 is not None and hi < b0:
            problems.append(
                f"max_batch_size must be >= initial_batch_size (got max_batch_size={hi}, "
                f"initial_batch_size={b0}); raise max_batch_size or lower initial_batch_size"
            )
        if hi is not None and lo is not None and hi < lo:
            problems.append(
                f"max_batch_size must be >= min_batch_size (got max_batch_size={hi}, "
                f"min_batch_size={lo}); raise max_batch_size or lower min_batch_size"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return hi


class LRConfig(_Section):
    """How the learning rate follows the batch size and the schedule.

    Attributes:
        lr_scaling: rule mapping the base LR (tuned at ``initial_batch_size``) to the LR at
            the current batch size: a name from :data:`autobatch.registry.LR_SCALINGS`
            (``"linear"``, ``"sqrt"``, ``"adascale"``, ``"none"``), an
            :class:`~autobatch.scaling.LRScaling` instance, or ``None`` for the default
            of the optimizer family (:func:`autobatch.scaling.default_scaling`:
            ``"adascale"`` for SGD, ``"sqrt"`` for Adam-family and others). A policy may
            ask for another default: with ``ramp`` ``None`` becomes ``"none"`` (the ramp's
            batch growth stands in for LR decay, so the LR must not grow with the batch).
        lr_milestones: epochs (strictly increasing, >= 0) at which the step schedule acts.
            The ``fixed`` policy multiplies the LR by ``lr_decay`` at each; the ``ramp``
            policy grows the batch by ``1/lr_decay`` instead.
        lr_decay: factor in (0, 1] applied at each milestone.
        warmup_steps: optimizer steps of linear LR warm-up from 0 at the start.
        max_lr_factor: the scaling rule's factor never exceeds this (``None``: no cap). A
            base LR tuned at ``B0`` is often close to the largest stable LR; on MNIST-1D with
            plain SGD the best LR was 0.2 at B=16 and 0.4 from B=64 up, and 0.8 diverged at
            every B (docs/design/benchmarking.md), while the AdaScale gain kept growing with
            the noise scale and reached 3x. The default 2.0 keeps that headroom.
        max_grad_norm: clip the step's gradient to this L2 norm (over all trainable
            parameters, of the mean loss, unscaled under fp16) before the optimizer step;
            ``None``: no clipping. The noise-scale estimator sees the norms before clipping.
        scale_betas: keep Adam's moment averages' half-lives fixed in examples when B
            changes (Marek et al. 2025): each group's ``beta`` becomes ``beta^(B/B0)``, the
            user's betas being those at ``B0``. ``"beta2"`` scales the second-moment beta
            only, ``"both"`` both; ``"none"`` (default) leaves them. For optimizers with
            ``betas`` in their param groups (Adam, AdamW, ...).
        scale_weight_decay: keep AdamW's decoupled weight decay per example when B or the
            LR factor changes (the timescale ``B / (LR x wd)`` of Bergsma et al. 2025): each
            group's ``weight_decay`` becomes ``wd x (B/B0) / f``, ``f`` autobatch's LR factor
            at B (the user's schedule and warm-up left out: their decay is theirs). Meant for
            decoupled decay (AdamW); off by default.
    """

    lr_scaling: Any = None  # a name, an LRScaling instance or None (see _known_scaling)
    lr_milestones: list[int] = Field(default_factory=list)
    lr_decay: float = Field(0.1, gt=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    max_lr_factor: float | None = Field(2.0, gt=0.0)
    max_grad_norm: float | None = Field(None, gt=0.0)
    scale_betas: Literal["none", "beta2", "both"] = "none"
    scale_weight_decay: bool = False

    @field_validator("lr_scaling")
    @classmethod
    def _known_scaling(cls, value: Any) -> Any:
        return None if value is None else check_spec("lr_scaling", value)

    @field_validator("lr_milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m < 0 for m in value) or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError(
                f"lr_milestones must be strictly increasing epochs >= 0 (got {value}); "
                "sort them and drop duplicates"
            )
        return value


class EstimatorConfig(_Section):
    """How the gradient noise scale is measured (see :mod:`autobatch.noise.estimator`).

    Attributes:
        gns_method: ``"micro"`` takes the small-batch gradients from the micro-batches of
            each step (free); ``"per_example"`` uses per-example gradient norms (``b = 1``);
            ``"off"`` measures nothing (only for the ``fixed`` and ``ramp`` policies with
            ``lr_scaling`` ``"linear"``, ``"sqrt"`` or ``"none"``; used to time the estimator).
        gns_smoothing: EMA decay of the estimator (0.95: about 20 steps of memory); raised
            when measurements are sparser than every 8th step (see ``gns_every``).
        gns_min_updates: updates before the estimate counts as ready.
        gns_every: with ``gns_method="micro"``, a step of one micro-batch is split in two to
            be measured every ``gns_every``-th step (and on each of the estimator's first
            ``1/(1-gns_smoothing)`` steps); steps split by the memory cap or shared by
            data-parallel ranks are measured at every step for free. ``"auto"``: every 8th
            step, or less often (a power of two, up to 64) where that keeps the splits within
            ``gns_overhead`` of the training time, calibrated from step times
            (:class:`~autobatch.train.step_norms.MeasureSchedule`), with the estimator's
            memory stretched to hold as many measurements; faster on small models, but two
            fresh runs may measure different steps (not bit-for-bit repeatable) and the
            estimate is older.
        gns_overhead: the fraction of training time ``gns_every="auto"`` lets the splits add.
        gns_geometry: the norm the noise scale is measured in. ``"raw"``: the gradients as
            they are, ``tr(Sigma)/|G|^2`` (SGD's geometry, the default for every optimizer).
            ``"adam"``: Adam's preconditioned gradients ``P g`` with ``P = 1/(sqrt(v_hat) + eps)``
            read from the optimizer's state at the start of each step,
            ``tr(P Sigma P)/|P G|^2`` (:mod:`autobatch.noise.preconditioned`); needs an
            Adam-family optimizer (param groups with ``betas`` and ``eps``), ``gns_method="micro"``
            and one process. The first step, before the optimizer has state, gives no estimate;
            gradient clipping still uses the raw norm. Costs one pass over Adam's state per step.
            Measured against the critical batch by branched training
            (docs/benchmarks/critical_batch.md, charlm with AdamW): the raw scale was 0.69-0.86x
            the measured critical batch at 5%, 20% and 50% of the run, the preconditioned one
            1.23-4.72x (far above it early, while Adam's second moments are young); hence
            ``"raw"`` stays the default for every optimizer.
    """

    gns_method: Literal["micro", "per_example", "off"] = "micro"
    gns_geometry: Literal["raw", "adam"] = "raw"
    gns_smoothing: float = Field(0.95, ge=0.0, lt=1.0)
    gns_min_updates: int = Field(3, ge=1)
    gns_every: int | Literal["auto"] = 8
    gns_overhead: float = Field(0.05, gt=0.0, lt=1.0)

    @field_validator("gns_every")
    @classmethod
    def _check_every(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError(f"gns_every must be an int >= 1 or 'auto' (got {value})")
        return value


class MemoryConfig(_Section):
    """The memory probe that bounds the micro-batch, and how a sharded model holds gradients.

    Attributes:
        probe_memory: run the probe; ``None`` means on for accelerators, and on CPU only
            when ``memory_budget`` is given.
        memory_budget: bytes a training step may use; an int, or a string such as
            ``"4GiB"`` or ``"500MB"`` (parsed by :func:`parse_bytes`). ``None``: the
            device's free memory.
        memory_margin: fraction of the budget kept free for what the probe cannot see
            (allocator caching, fragmentation, workspaces).
        max_micro_batch_size: an upper bound on the micro-batch, applied on top of the probe.
        fsdp_reduce: for a model sharded with FSDP2 ``fully_shard``, when gradients are
            reduce-scattered during accumulation: ``"micro_batch"`` after every micro-batch
            (only gradient shards are held: FSDP's memory saving; more communication) or
            ``"step"`` once, after the step's last micro-batch (the unsharded gradient is held
            in between). See :mod:`autobatch.train.sharded`.
    """

    probe_memory: bool | None = None
    memory_budget: int | None = Field(None, gt=0)
    memory_margin: float = Field(0.1, ge=0.0, lt=1.0)
    max_micro_batch_size: int | None = Field(None, ge=1)
    fsdp_reduce: Literal["micro_batch", "step"] = "micro_batch"

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: Any) -> Any:
        return parse_bytes(value) if isinstance(value, str) else value


class DataConfig(_Section):
    """Data order and loading.

    Attributes:
        shuffle: reshuffle the training set every epoch (seeded by ``seed``).
        seed: seed of the shuffling generator.
        num_workers: DataLoader worker processes (0 loads in the main process); None (the
            default) takes the ``num_workers`` of ``data`` when it is a DataLoader (whose
            ``pin_memory``, ``persistent_workers``, ``prefetch_factor`` and ``worker_init_fn``
            are followed too), else 0.
        small_tail: what to do with a step smaller than the model trains on (the last step of
            an epoch holding 1 example, with BatchNorm in train mode): ``"carry"`` fills it
            up to the batch size with the next epoch's first examples (one step spans the
            epoch boundary); ``"drop"`` skips its examples. Either way it is counted in
            ``FitResult.small_tails``. The smallest step is the memory probe's
            ``min_batch_size`` (per rank), or 2 per rank for a model with BatchNorm, else 1.
    """

    shuffle: bool = True
    seed: int = 0
    num_workers: int | None = Field(None, ge=0)
    small_tail: Literal["carry", "drop"] = "carry"


class LogConfig(_Section):
    """Progress display, evaluation, history and loggers.

    Attributes:
        progress: show a progress bar; ``None`` means only when stderr is a terminal.
        eval_every: optimizer steps between evaluations on ``val_data``; ``None`` means
            once per epoch.
        log_every: optimizer steps between progress-bar refreshes.
        checkpoint_every: optimizer steps between checkpoints (with ``checkpoint_dir``), on
            top of those written at every evaluation, at the end and on KeyboardInterrupt;
            ``None``: only those.
        loggers: where each step's figures go while the run goes, under stable names
            (:mod:`autobatch.loggers`): names from :data:`autobatch.registry.LOGGERS`
            (``"tensorboard"``, ``"jsonl"``, ``"csv"``, ``"wandb"``, ``"mlflow"``; one name alone
            is a list of one) and :class:`~autobatch.loggers.Logger` instances. Empty: none.
        log_dir: the folder the named loggers write to (TensorBoard's event files,
            ``metrics.jsonl``, ``metrics.csv``, W&B's files); created when the run starts.
    """

    progress: bool | None = None
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    # Any: the registry checks names and instances, so this module imports no plug-in.
    loggers: list[Any] = Field(default_factory=list)
    log_dir: Path = Path("autobatch_logs")

    @field_validator("loggers", mode="before")
    @classmethod
    def _known_loggers(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) or not isinstance(value, (list, tuple)) else list(value)
        problems = []
        for item in items:
            try:
                check_spec("logger", item)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return items


class FitConfig(BaseModel):
    """Everything :func:`autobatch.fit` can be told, grouped by concern.

    Attributes:
        batch: :class:`BatchConfig`.
        lr: :class:`LRConfig`.
        estimator: :class:`EstimatorConfig`.
        memory: :class:`MemoryConfig`.
        data: :class:`DataConfig`.
        log: :class:`LogConfig`.
        max_nonfinite_steps: consecutive optimizer steps skipped for a non-finite loss or
            gradient before ``fit`` stops with an error.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    batch: BatchConfig = Field(default_factory=BatchConfig)
    lr: LRConfig = Field(default_factory=LRConfig)
    estimator: EstimatorConfig = Field(default_factory=EstimatorConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    max_nonfinite_steps: int = Field(5, ge=1)

    @model_validator(mode="wrap")
    @classmethod
    def _plugin_needs(cls, data: Any, handler: ModelWrapValidatorHandler[FitConfig]) -> FitConfig:
        """Check what the named policy and LR rule need of the other settings (the registry
        asks the plug-in), reported with every other invalid field; then let the policy pick
        the default LR rule."""
        try:
            cfg = handler(data)
        except ValidationError as err:
            errors = err.errors(include_url=False)
            problems = _plugin_problems(_settings_of_valid_fields(data, errors))
            if not problems:
                raise
            raise ValidationError.from_exception_data(err.title, [*errors, *problems]) from None
        problems = _plugin_problems(cfg.settings())
        if problems:
            raise ValidationError.from_exception_data(cls.__name__, problems)
        if cfg.lr.lr_scaling is None or isinstance(cfg.lr.lr_scaling, _PolicyDefault):
            # Marked, so that a later change of policy picks that policy's default again.
            picked = default_lr_scaling(cfg.batch.policy)
            cfg.lr.lr_scaling = None if picked is None else _PolicyDefault(picked)
        return cfg

    def settings(self) -> dict[str, Any]:
        """Every setting by its flat name (``{"policy": "gns", "lr_milestones": [], ...}``),
        the values themselves (plug-in instances are not copied)."""
        flat = {name: value for name, value in vars(self).items() if name not in _sections()}
        for name in _sections():
            flat.update(vars(getattr(self, name)))
        return flat

    @classmethod
    def from_any(cls, config: FitConfig | dict[str, Any] | None = None, **overrides: Any) -> FitConfig:
        """Build a config from a FitConfig, a dict or nothing, then apply overrides.

        Dicts and overrides may name a section with a dict (``batch={"policy": "ramp"}``)
        or a field flat (``policy="ramp"``); flat and nested forms can be mixed, later
        entries win. The input config is never modified.

        Args:
            config: a :class:`FitConfig`, a (nested or flat) dict, or ``None`` for defaults.
            **overrides: settings applied on top of ``config``.

        Returns:
            A new, validated :class:`FitConfig`.

        Raises:
            ValueError: for a key that is no setting (the message lists close matches and
                every valid key), or a pydantic ``ValidationError`` (a ``ValueError``)
                listing every invalid value.
            TypeError: if ``config`` is of another type.
        """
        if config is None:
            merged: dict[str, dict[str, Any] | Any] = {}
        elif isinstance(config, FitConfig):
            merged = config.model_dump()
        elif isinstance(config, dict):
            merged = {}
            _merge(merged, config)
        else:
            raise TypeError(
                f"config must be a FitConfig, a dict or None (got {type(config).__name__})"
            )
        _merge(merged, overrides)
        return cls.model_validate(merged)


class _PolicyDefault(str):
    """An LR rule name the config filled in from the policy's default (equal to the plain
    name); a later change of policy replaces it, a name the user gave is kept."""

    __slots__ = ()


def _sections() -> dict[str, type[BaseModel]]:
    return {
        name: field.annotation  # type: ignore[misc]
        for name, field in FitConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
    }


def _settings_of_valid_fields(data: Any, errors: list[Any]) -> dict[str, Any]:
    """The flat settings of raw ``data`` that validate, leaving out every field with an error
    (so that a plug-in needing one of them is not judged on a stand-in default)."""
    if not isinstance(data, dict):
        return {}
    bad = {tuple(e["loc"][:2]) for e in errors}
    flat: dict[str, Any] = {}
    for name, model in _sections().items():
        raw = data.get(name, {})
        raw = vars(raw) if isinstance(raw, BaseModel) else raw
        if not isinstance(raw, dict) or (name,) in bad:
            continue
        try:
            section = model.model_validate({k: v for k, v in raw.items() if (name, k) not in bad})
        except ValidationError:  # a check across fields that needs a dropped one
            continue
        flat.update({k: v for k, v in vars(section).items() if (name, k) not in bad})
    return flat


def _plugin_problems(settings: dict[str, Any]) -> list[InitErrorDetails]:
    """Pydantic errors, one per setting, for what the named plug-ins need (see
    :func:`autobatch.registry.config_problems`)."""
    sections = _flat_keys()
    found: dict[str, str] = {}
    for family in ("policy", "lr_scaling"):  # the families' setting names
        found.update(config_problems(family, settings.get(family), settings))
    return [
        InitErrorDetails(
            type=PydanticCustomError("plugin_settings", "{message}", {"message": message}),
            loc=(sections[name], name),
            input=settings.get(name),
        )
        for name, message in found.items()
    ]


def _flat_keys() -> dict[str, str]:
    """Every section field name -> its section."""
    return {key: section for section, model in _sections().items() for key in model.model_fields}


# DataLoader arguments people pass to fit: where each goes instead.
_DATA_LOADER_ARGS = {
    "collate_fn": "not a fit setting: pass the data as a DataLoader whose collate_fn pads each batch, e.g. "
                  "fit(model, DataLoader(dataset, collate_fn=pad), ...); autobatch uses its collate_fn, not its "
                  "batch size",
    "sampler": "not a fit setting: pass the data as a DataLoader with it, e.g. "
               "fit(model, DataLoader(dataset, sampler=sampler), ...)",
}


def _merge(merged: dict[str, Any], items: dict[str, Any]) -> None:
    """Put ``items`` (flat or nested keys) into the nested dict ``merged``, in order."""
    sections, flat = _sections(), _flat_keys()
    top = set(FitConfig.model_fields) - set(sections)
    unknown = []
    for key, value in items.items():
        if key in sections and isinstance(value, (dict, BaseModel)):
            inner = value.model_dump() if isinstance(value, BaseModel) else value
            bad = [k for k in inner if k not in sections[key].model_fields]
            unknown += [f"{key}.{k}" for k in bad]
            target = merged.setdefault(key, {})
            if isinstance(target, BaseModel):  # a section given as a model earlier
                target = merged[key] = target.model_dump()
            target.update({k: v for k, v in inner.items() if k not in bad})
        elif key in flat:
            target = merged.setdefault(flat[key], {})
            if isinstance(target, BaseModel):
                target = merged[flat[key]] = target.model_dump()
            target[key] = value
        elif key in top or key in sections:
            merged[key] = value  # pydantic reports a section given as a non-dict
        else:
            unknown.append(key)
    if unknown:
        valid = sorted(top) + sorted(flat)
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3, cutoff=0.6)
            elsewhere = _DATA_LOADER_ARGS.get(key.rsplit(".", 1)[-1])
            hints.append(f"{key!r}" + (f" ({elsewhere})" if elsewhere else
                                       f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
            f"valid settings: {', '.join(valid)}"
        )


_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """A memory size in bytes from an int or a string such as ``"4GiB"`` or ``"500MB"``.

    Units are case-insensitive: ``B``; decimal ``KB MB GB TB`` (powers of 1000); binary
    ``KiB MiB GiB TiB`` (powers of 1024). A bare number is bytes. Fractions are rounded to
    the nearest byte (``"1.5KiB"`` is 1536).

    Raises:
        ValueError: for an unknown unit, a malformed string or a size that is not positive.
        TypeError: for a value that is neither a number nor a string.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(
            f"a memory size must be an int (bytes) or a string like '4GiB' "
            f"(got {type(value).__name__})"
        )
    if isinstance(value, str):
        match = _BYTES_RE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _UNITS):
            raise ValueError(
                f"cannot read memory size {value!r}; write a number and a unit from "
                f"{', '.join(['B', 'KB', 'MB', 'GB', 'TB', 'KiB', 'MiB', 'GiB', 'TiB'])}, "
                "e.g. '4GiB' or '500MB'"
            )
        number = float(match.group(1)) * _UNITS[unit or "b"]
    else:
        number = float(value)
    if not math.isfinite(number) or round(number) <= 0:
        raise ValueError(f"a memory size must be > 0 bytes (got {value!r})")
    return round(number)
