"""Linear regression whose gradient noise scale is known in closed form.

The population: inputs ``x ~ N(0, diag(v))`` in ``dim`` dimensions (variances ``v``
log-spaced from 1 down to ``min_variance``), targets ``y = w*.x + b* + eps`` with
``eps ~ N(0, sigma^2)``. The model is ``nn.Linear(dim, 1)``; the loss of one example is the
squared residual ``r^2`` with ``r = w.x + b - y`` (``mse_loss``, mean over the batch).

Closed form (McCandlish et al. 2018 notation). Write ``d = w - w*``, ``c = b - b*``. The
per-example gradient is ``g = 2 r (x, 1)``. Gaussian moments (Isserlis:
``E[(d.x)^2 |x|^2] = (d'Vd) tr V + 2 d'V^2 d``, odd moments vanish) give

    |G|^2     = 4 (d'V^2 d + c^2)
    E|g|^2    = 4 (e (tr V + 1) + 2 d'V^2 d),     e = d'Vd + c^2 + sigma^2 = E[r^2]
    tr(Sigma) = E|g|^2 - |G|^2 = 4 (e (tr V + 1) + d'V^2 d - c^2)
    B_simple  = tr(Sigma) / |G|^2 = (e (tr V + 1) + d'V^2 d - c^2) / (d'V^2 d + c^2)

``e`` is the population loss. Near the optimum ``B_simple ~ sigma^2 (tr V + 1) / |G/2|^2``
grows without bound as the gradient vanishes: the regime where adaptive batch sizes pay off.
These are population values (expectations over the distribution, not over the finite
training set); :func:`gradient_moments` computes them and is checked against brute-force
per-example gradients in the tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
from torch import nn

from autobatch.problems import Problem, _plain_sgd, _seeded_model

__all__ = ["SyntheticExample", "build", "gradient_moments", "population"]


def gradient_moments(
    weight_error: torch.Tensor, bias_error: float, variances: torch.Tensor, noise_var: float
) -> tuple[float, float]:
    """Population ``(|G|^2, tr(Sigma))`` of the squared loss ``r^2`` at a linear model.

    Args:
        weight_error: ``d = w - w*``, shape ``(dim,)``.
        bias_error: ``c = b - b*``.
        variances: the input variances ``v`` (diagonal covariance), shape ``(dim,)``.
        noise_var: ``sigma^2``, the variance of the label noise.

    Returns:
        ``(grad_sq, trace_cov)`` of the per-example gradient with respect to ``(w, b)``,
        for a mean-reduced loss (so ``E|G_B|^2 = grad_sq + trace_cov / B``).
    """
    d, v = weight_error.double(), variances.double()
    dvd = float((d * v * d).sum())
    dv2d = float((d * v * v * d).sum())
    c2 = float(bias_error) ** 2
    loss = dvd + c2 + noise_var
    grad_sq = 4.0 * (dv2d + c2)
    trace_cov = 4.0 * (loss * (float(v.sum()) + 1.0) + dv2d - c2)
    return grad_sq, trace_cov


@dataclasses.dataclass(frozen=True)
class Population:
    """The data distribution: ``x ~ N(0, diag(variances))``, ``y = w_star.x + b_star + eps``."""

    variances: torch.Tensor
    w_star: torch.Tensor
    b_star: float
    noise_std: float

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` fresh examples: float32 ``X`` of shape ``(n, dim)``, ``y`` of shape ``(n, 1)``."""
        dim = self.variances.numel()
        x = torch.randn(n, dim, generator=generator, dtype=torch.float64) * self.variances.sqrt()
        eps = torch.randn(n, generator=generator, dtype=torch.float64) * self.noise_std
        y = x @ self.w_star + self.b_star + eps
        return x.float(), y.float().unsqueeze(1)


def population(
    dim: int = 16, min_variance: float = 0.01, noise_std: float = 0.5, data_seed: int = 0
) -> Population:
    """The population the example samples from; ``w*`` has N(0, 1) entries, ``b* = 1``."""
    g = torch.Generator().manual_seed(data_seed)
    variances = torch.logspace(0.0, math.log10(min_variance), dim, dtype=torch.float64)
    w_star = torch.randn(dim, generator=g, dtype=torch.float64)
    return Population(variances, w_star, 1.0, noise_std)


@functools.lru_cache(maxsize=4)
def _generate(
    num_train: int, num_val: int, dim: int, min_variance: float, noise_std: float, data_seed: int
) -> tuple[torch.Tensor, ...]:
    pop = population(dim, min_variance, noise_std, data_seed)
    # The data seed plus one, so the samples do not reuse the draws behind w*.
    g = torch.Generator().manual_seed(data_seed + 1)
    x, y = pop.sample(num_train + num_val, g)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticExample(Problem):
    """An :class:`Problem` whose gradient noise scale is known exactly.

    Attributes:
        population: the data distribution the train and validation sets were drawn from.
    """

    population: Population | None = None

    def exact_moments(self, model: nn.Linear) -> tuple[float, float]:
        """Population ``(|G|^2, tr(Sigma))`` at ``model``'s current weights (see the module
        docstring), for the mean-reduced squared loss."""
        pop = self.population
        assert pop is not None
        w = model.weight.detach().reshape(-1).double().cpu()
        b = float(model.bias.detach()) if model.bias is not None else 0.0
        return gradient_moments(w - pop.w_star, b - pop.b_star, pop.variances, pop.noise_std**2)

    def exact_noise_scale(self, model: nn.Linear) -> float:
        """``B_simple = tr(Sigma) / |G|^2`` in examples, exact for the population at ``model``'s
        current weights (infinite at the optimum, where ``|G| = 0``)."""
        grad_sq, trace_cov = self.exact_moments(model)
        return trace_cov / grad_sq if grad_sq > 0.0 else float("inf")


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def build(
    seed: int = 0,
    *,
    num_train: int = 4096,
    num_val: int = 8192,
    dim: int = 16,
    min_variance: float = 0.01,
    noise_std: float = 0.5,
    data_seed: int = 0,
) -> SyntheticExample:
    """Linear regression with a known noise scale; metric ``val_loss`` (lower is better).

    Args:
        seed: seeds the model initialisation.
        num_train: training examples.
        num_val: validation examples.
        dim: input dimension.
        min_variance: smallest input variance (the largest is 1); sets the conditioning.
        noise_std: label noise ``sigma``; the best reachable loss is ``sigma^2``.
        data_seed: seeds ``w*`` and the samples.

    The target is a validation loss of ``1.05 sigma^2``: within 5% of the noise floor.
    """
    errors = []
    if num_train < 1 or num_val < 1:
        errors.append(
            f"num_train and num_val must be >= 1 (got num_train={num_train}, num_val={num_val})"
        )
    if dim < 1:
        errors.append(f"dim must be >= 1 (got dim={dim})")
    if not 0.0 < min_variance <= 1.0:
        errors.append(f"min_variance must be in (0, 1] (got min_variance={min_variance})")
    if not noise_std > 0.0:
        errors.append(
            f"noise_std must be > 0 (got noise_std={noise_std}); the target is "
            "1.05 x noise_std^2, which needs label noise"
        )
    if errors:
        raise ValueError("; ".join(errors))
    x, y, x_val, y_val = _generate(
        num_train, num_val, dim, float(min_variance), float(noise_std), data_seed
    )
    return SyntheticExample(
        name="synthetic",
        model_fn=functools.partial(_seeded_model, functools.partial(nn.Linear, dim, 1), seed),
        train_data=(x.clone(), y.clone()),
        val_data=(x_val.clone(), y_val.clone()),
        loss_fn=_mse,
        metric_name="val_loss",
        higher_is_better=False,
        target=1.05 * noise_std**2,
        default_lr=0.05,
        default_batch_size=16,
        default_epochs=10,
        optimizer=_plain_sgd,
        classification=False,
        description=(
            "linear regression with a closed-form noise scale, plain SGD; "
            "target 1.05x the noise floor"
        ),
        options={
            "num_train": num_train, "num_val": num_val, "dim": dim,
            "min_variance": min_variance, "noise_std": noise_std, "data_seed": data_seed,
        },
        population=population(dim, min_variance, noise_std, data_seed),
    )
