"""An unchanged LightningModule for the integration tests: linear regression with label noise.

Near the optimum the gradient shrinks while the per-example noise stays, so the gradient noise
scale grows as the loss falls (the closed form is in autobatch.problems.synthetic): the regime
in which an adaptive batch grows.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Regression(pl.LightningModule):
    """``nn.Linear`` on a mean squared error, SGD; nothing autobatch-specific."""

    def __init__(self, dim: int = 16, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Linear(dim, 1)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The module's loss as a function, for autobatch.fit on ``Regression().net``."""
    return nn.functional.mse_loss(output.squeeze(-1), target)


def regression_data(n: int = 4096, dim: int = 16, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, generator=g) + noise * torch.randn(n, generator=g)
    return x, y


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, **kwargs)


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or summary unless asked."""
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False}
    return pl.Trainer(**{**defaults, **kwargs})
