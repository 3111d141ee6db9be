"""Shared by the whole suite: one torch thread, the global RNG seeded before each test, and the
builders several test files use (data, the squared-error loss, the flat gradient).

The builders are fixtures that return a function, so a test draws its data where it needs it::

    def test_x(regression, mse):
        x, y = regression(n=256, noise=0.1)

Each builder draws from its own seeded generator (the global RNG untouched) unless it says
otherwise, so a test gets the same tensors whatever ran before it.
"""

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

# Two cores shared by everything: one intra-op thread keeps tests predictable.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")

Data = tuple[torch.Tensor, torch.Tensor]
DISTRIBUTED = Path(__file__).resolve().parent / "distributed"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse to run a test of tests/distributed/ without the ``distributed`` and ``slow``
    markers: each launches ranks through torch.distributed.run, and ``-m "not slow"`` or
    ``-m "not distributed"`` must leave it out."""
    unmarked = [item.nodeid for item in items if DISTRIBUTED in item.path.resolve().parents
                and not {"distributed", "slow"} <= {mark.name for mark in item.iter_markers()}]
    if unmarked:
        raise pytest.UsageError("tests in tests/distributed/ must be marked distributed and slow "
                                f"(a module-level pytestmark does it): {', '.join(unmarked)}")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _regression(n: int = 512, d: int = 8, noise: float = 1.0, seed: int = 0) -> Data:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + noise * torch.randn(n, 1, generator=g)
    return x, y


@pytest.fixture
def regression() -> Callable[..., Data]:
    """``regression(n=512, d=8, noise=1.0, seed=0) -> (x, y)``: linear regression with label
    noise, ``x`` of shape (n, d) and ``y = x @ w + noise * e`` of shape (n, 1), with ``x``,
    ``w`` and ``e`` standard normal, drawn in that order from a generator seeded with ``seed``."""
    return _regression


def _noise_data(n: int, d: int, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, 1, generator=g)


@pytest.fixture
def noise_data() -> Callable[[int, int, int], Data]:
    """``noise_data(n, d, seed) -> (x, y)``: inputs of shape (n, d) and targets of shape (n, 1)
    unrelated to them, both standard normal, drawn in that order from a generator seeded with
    ``seed``."""
    return _noise_data


def _classification(n: int, d: int, classes: int = 3) -> Data:
    return torch.randn(n, d), torch.randint(classes, (n,))


@pytest.fixture
def classification() -> Callable[..., Data]:
    """``classification(n, d, classes=3) -> (x, y)``: standard normal inputs of shape (n, d) and
    uniform labels in ``[0, classes)``, drawn in that order from the global RNG (seeded before
    each test), so where in a test it is called matters."""
    return _classification


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.fixture
def mse() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean squared error, written out: ``((out - y) ** 2).mean()``."""
    return _mse


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture
def flat_grad() -> Callable[[nn.Module], torch.Tensor]:
    """``flat_grad(model)``: the ``.grad`` of every parameter that has one, flattened and
    concatenated in ``model.parameters()`` order."""
    return _flat_grad


@pytest.fixture
def quiet_user_warnings() -> Iterator[None]:
    """UserWarnings ignored for the test (the Hugging Face models of ``autobatch.testing``
    warn about their configs); use it with ``pytest.mark.usefixtures``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
