"""Small problems with a brute-force reference, shared by the tests and the GNS benchmarks.

Each problem is a model, a whole (small) data set and a mean-reduced loss. The reference
computes every example's gradient over the whole data set (``torch.func.vmap`` over the full
model, or a plain loop), independently of the hooks under test, and from them the exact
population quantities of that data set:

    G = mean_i g_i,   tr(Sigma) = mean_i |g_i - G|^2,   B_simple = tr(Sigma) / |G|^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_fn: LossFn


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y)


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class TinyTransformer(nn.Module):
    """Token and position embeddings, one single-head causal attention block built from
    Linear layers on 3-D inputs, LayerNorms, an MLP and a token-level output layer."""

    def __init__(self, vocab: int = 16, width: int = 16, length: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        h = self.tok(tokens) + self.pos(positions)
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        h = h + self.proj(att @ v)
        h = h + self.mlp(self.ln2(h))
        return self.head(h)


def _settle(problem: Problem, steps: int, lr: float) -> Problem:
    """Full-batch gradient descent, deterministic: moves the parameters towards a minimum,
    where |G| shrinks and the noise scale grows."""
    opt = torch.optim.SGD(problem.model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        problem.loss_fn(problem.model(problem.x), problem.y).backward()
        opt.step()
    problem.model.zero_grad(set_to_none=True)
    return problem


def logistic(n: int = 4096, d: int = 64, steps: int = 0, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, generator=gen) / math.sqrt(d) * 2.0
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w)).float()
    torch.manual_seed(seed)
    return _settle(Problem("logistic", nn.Linear(d, 1), x, y, _bce), steps, lr=0.5)


def mlp(n: int = 4096, d: int = 32, classes: int = 10, steps: int = 0, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen) + torch.randn(n, classes, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, classes))
    return _settle(Problem("mlp", model, x, y, F.cross_entropy), steps, lr=0.5)


def cnn(n: int = 4096, classes: int = 4, steps: int = 0, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2)) @ torch.randn(8, classes, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, classes),
    )
    return _settle(Problem("cnn", model, x, y, F.cross_entropy), steps, lr=0.5)


def sequence(n: int = 4096, vocab: int = 16, length: int = 8, steps: int = 0, seed: int = 0) -> Problem:
    """Next-token prediction on sequences from a fixed random first-order Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), dim=1)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=gen).squeeze(1)
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, 16, length)
    return _settle(Problem("sequence", model, tokens[:, :-1], tokens[:, 1:], _token_ce), steps, lr=0.5)


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "logistic": logistic,
    "mlp": mlp,
    "cnn": cnn,
    "sequence": sequence,
}


# -- brute-force references ------------------------------------------------------------------
def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """Every example's flattened gradient of its own loss, shape (n, P), by ``torch.func``
    over the whole model (trainable parameters only, in ``model.parameters()`` order)."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def per_example_sq_norms_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """Squared norms of every example's gradient, one backward per example (no torch.func)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params, allow_unused=True)
        out.append(sum(float(g.double().square().sum()) for g in grads if g is not None))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class Exact:
    noise_scale: float
    grad_sq: float
    trace_cov: float


def exact_noise_scale(problem: Problem, chunk: int = 1024) -> Exact:
    """Population |G|^2, tr(Sigma) and B_simple of the whole data set (float64 sums)."""
    total, total_sq = None, 0.0
    n = problem.x.shape[0]
    for start in range(0, n, chunk):
        g = per_example_grads(problem.model, problem.x[start : start + chunk], problem.y[start : start + chunk], problem.loss_fn).double()
        total = g.sum(0) if total is None else total + g.sum(0)
        total_sq += float(g.square().sum())
    mean = total / n
    grad_sq = float(mean.square().sum())
    trace_cov = total_sq / n - grad_sq
    return Exact(trace_cov / grad_sq, grad_sq, trace_cov)
