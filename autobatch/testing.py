"""Small problems with a brute-force reference, shared by the tests and the GNS benchmarks;
and the models people bring (``USER_MODELS``: tiny Hugging Face GPT-2 and BERT, a two-input
model, a padded LM with tied weights, a BatchNorm CNN, a GRU) for the batch-protocol tests.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class ExactCase:
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


class Block(nn.Module):
    """One pre-norm transformer block: single-head causal attention and an MLP, residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        att = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
        mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
        h = h + self.proj(att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v)
        return h + self.mlp(self.ln2(h))


class BlockTransformer(nn.Module):
    """A causal transformer of ``depth`` :class:`Block` modules in ``self.blocks``, the layout
    FSDP2 users shard (``fully_shard`` on each block, then on the root, which keeps the
    embeddings and the output layer); logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int = 16, width: int = 16, length: int = 8, depth: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device).expand(b, t))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def markov_tokens(n: int, vocab: int = 16, length: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences of ``length + 1`` tokens from a random sparse Markov chain, as next-token
    pairs ``(inputs, targets)`` of shape ``(n, length)``: learnable, with a known noise floor."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.rand(vocab, vocab, generator=gen) ** 4
    transition /= transition.sum(1, keepdim=True)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=gen).squeeze(1)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position, mean-reduced (the loss of :class:`BlockTransformer`)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _settle(problem: ExactCase, steps: int, lr: float) -> ExactCase:
    """Full-batch gradient descent, deterministic: moves the parameters towards a minimum,
    where |G| shrinks and the noise scale grows."""
    opt = torch.optim.SGD(problem.model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        problem.loss_fn(problem.model(problem.x), problem.y).backward()
        opt.step()
    problem.model.zero_grad(set_to_none=True)
    return problem


def logistic(n: int = 4096, d: int = 64, steps: int = 0, seed: int = 0) -> ExactCase:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(d, generator=gen) / math.sqrt(d) * 2.0
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w)).float()
    torch.manual_seed(seed)
    return _settle(ExactCase("logistic", nn.Linear(d, 1), x, y, _bce), steps, lr=0.5)


def mlp(n: int = 4096, d: int = 32, classes: int = 10, steps: int = 0, seed: int = 0) -> ExactCase:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen) + torch.randn(n, classes, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, classes))
    return _settle(ExactCase("mlp", model, x, y, F.cross_entropy), steps, lr=0.5)


def cnn(n: int = 4096, classes: int = 4, steps: int = 0, seed: int = 0) -> ExactCase:
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
    return _settle(ExactCase("cnn", model, x, y, F.cross_entropy), steps, lr=0.5)


def sequence(n: int = 4096, vocab: int = 16, length: int = 8, steps: int = 0, seed: int = 0) -> ExactCase:
    """Next-token prediction on sequences from a fixed random first-order Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=gen), dim=1)
    tokens = torch.empty(n, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(transition[tokens[:, t]], 1, generator=gen).squeeze(1)
    torch.manual_seed(seed)
    model = TinyTransformer(vocab, 16, length)
    return _settle(ExactCase("sequence", model, tokens[:, :-1], tokens[:, 1:], _token_ce), steps, lr=0.5)


EXACT_CASES: dict[str, Callable[..., ExactCase]] = {
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


def per_example_sq_norms_same_forward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, per_example_loss: LossFn, seed: int = 0
) -> torch.Tensor:
    """Squared norms of every example's gradient from one batched forward (run after
    ``torch.manual_seed(seed)``, so dropout draws the masks a seeded batched forward draws),
    one backward per example of its own loss; ``per_example_loss`` returns shape ``(n,)``.
    Valid when examples do not interact (no BatchNorm in train mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)
    losses = per_example_loss(model(x), y)
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        out.append(sum(float(g.double().square().sum()) for g in grads if g is not None))
    return torch.tensor(out, dtype=torch.float64)


@dataclass
class Exact:
    noise_scale: float
    grad_sq: float
    trace_cov: float


def exact_noise_scale(problem: ExactCase, chunk: int = 1024) -> Exact:
    """Population |G|^2, tr(Sigma) and B_simple of the whole data set (float64 sums)."""
    total, total_sq = None, 0.0
    n = problem.x.shape[0]
    for start in range(0, n, chunk):
        g = per_example_grads(
            problem.model, problem.x[start : start + chunk], problem.y[start : start + chunk], problem.loss_fn
        ).double()
        total = g.sum(0) if total is None else total + g.sum(0)
        total_sq += float(g.square().sum())
    mean = total / n
    grad_sq = float(mean.square().sum())
    trace_cov = total_sq / n - grad_sq
    return Exact(trace_cov / grad_sq, grad_sq, trace_cov)


# -- the models people bring (issue 10): each built the way its users build it, no glue -----
@dataclass
class UserCase:
    """A model with data and loss in the form its users have them, for the protocol tests.

    ``data`` is what the user passes to ``fit`` / ``probe_memory`` / ``measure_noise_scale``;
    ``loss_fn`` is None where the model computes its own loss (Hugging Face, dict batches).
    """

    name: str
    model: nn.Module
    data: Any
    loss_fn: LossFn | None = None
    forward_loss: Any = None
    loss_items: Any = "auto"


def pad_collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad a list of ``{"input_ids": 1-D, "labels": 1-D}`` items into one dict batch:
    ``input_ids`` padded with 0, ``labels`` with -100 (ignored), and an ``attention_mask``.
    A module-level function, so DataLoader workers can pickle it."""
    length = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), length, dtype=torch.long)
    labels = torch.full((len(items), length), -100, dtype=torch.long)
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        ids[row, :n] = torch.as_tensor(item["input_ids"])
        labels[row, :n] = torch.as_tensor(item["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(tokens, targets)`` pairs of varying length: tokens with 0, targets with -100."""
    length = max(len(x) for x, _ in items)
    xs = torch.zeros(len(items), length, dtype=torch.long)
    ys = torch.full((len(items), length), -100, dtype=torch.long)
    for row, (x, y) in enumerate(items):
        xs[row, : len(x)], ys[row, : len(y)] = x, y
    return xs, ys


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the torch RNG seeded by ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _sequences(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    # Tokens follow a simple rule (next = previous + 1 mod vocab, with noise) so losses fall.
    out = []
    for length in lengths.tolist():
        start = int(torch.randint(1, vocab, (1,), generator=gen))
        seq = (start + torch.arange(length)) % (vocab - 1) + 1
        noise = torch.rand(length, generator=gen) < 0.2
        seq[noise] = torch.randint(1, vocab, (int(noise.sum()),), generator=gen)
        out.append(seq)
    return out


def tiny_gpt2(n: int = 96, vocab: int = 48, max_len: int = 16, seed: int = 0) -> UserCase:
    """A 2-layer Hugging Face GPT-2 built from a config, on right-padded sequences of 4 to
    ``max_len`` tokens: a DataLoader of dict items whose collate_fn pads each batch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, loss_type="ForCausalLM",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _seeded(lambda: GPT2LMHeadModel(config), seed)
    items = [{"input_ids": s, "labels": s} for s in _sequences(n, vocab, 4, max_len, seed)]
    loader = torch.utils.data.DataLoader(_ListDataset(items), batch_size=8, collate_fn=pad_collate)
    return UserCase("gpt2", model, loader)


def tiny_bert_mlm(n: int = 96, vocab: int = 48, max_len: int = 16, seed: int = 0) -> UserCase:
    """A 2-layer Hugging Face ``BertForMaskedLM`` from a config; 15% of the tokens masked
    (id ``vocab - 1``), the others labelled -100; padded per batch."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = _seeded(lambda: BertForMaskedLM(config), seed)
    gen = torch.Generator().manual_seed(seed + 1)
    items = []
    for seq in _sequences(n, vocab - 1, 4, max_len, seed):
        masked = torch.rand(len(seq), generator=gen) < 0.15
        masked[0] = True  # at least one loss token per example
        labels = torch.where(masked, seq, torch.full_like(seq, -100))
        items.append({"input_ids": torch.where(masked, torch.full_like(seq, vocab - 1), seq),
                      "labels": labels})
    loader = torch.utils.data.DataLoader(_ListDataset(items), batch_size=8, collate_fn=pad_collate)
    return UserCase("bert_mlm", model, loader)


class TwoInputNet(nn.Module):
    """``forward(image_features, tabular)``: two inputs, one output."""

    def __init__(self, d1: int = 12, d2: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.a = nn.Linear(d1, 16)
        self.b = nn.Linear(d2, 16)
        self.head = nn.Linear(16, classes)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


def two_input(n: int = 256, seed: int = 0) -> UserCase:
    """A model taking two inputs; data ``(X1, X2, y)`` tensors."""
    gen = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(n, 12, generator=gen), torch.randn(n, 5, generator=gen)
    y = (x1[:, :3] + x2[:, :3]).argmax(1)
    model = _seeded(TwoInputNet, seed)
    return UserCase("two_input", model, (x1, x2, y), F.cross_entropy)


class TiedLM(nn.Module):
    """Plain PyTorch LM: token embedding plus position embeddings looked up as
    ``pos(arange(T))`` (shape ``(T, D)``, broadcast over the batch), a per-position MLP, and
    an output layer tied to the token embedding."""

    def __init__(self, vocab: int = 32, width: int = 24, max_len: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.tok.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        h = h + self.mlp(self.ln(h))
        return self.out(h)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy over targets != -100 (PyTorch's ignore_index)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def padded_lm(n: int = 128, vocab: int = 32, max_len: int = 16, seed: int = 0) -> UserCase:
    """A plain-PyTorch LM with tied weights on variable-length sequences: a Dataset of
    ``(tokens, next_tokens)`` pairs, a collate_fn padding targets with -100, and a
    token-mean loss (``loss_items="tokens"``: micro-batches weighted by real tokens)."""
    items = [(s[:-1], s[1:]) for s in _sequences(n, vocab, 5, max_len + 1, seed)]
    model = _seeded(lambda: TiedLM(vocab, 24, max_len), seed)
    loader = torch.utils.data.DataLoader(_ListDataset(items), batch_size=8, collate_fn=pad_pairs)
    return UserCase("padded_lm", model, loader, token_loss, loss_items="tokens")


class SmallResNet(nn.Module):
    """Conv + BatchNorm blocks with a residual connection, down to 1x1 feature maps on 8x8
    images, then BatchNorm1d: at batch size 1 BatchNorm sees one value per channel."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(self.down(h))


def batchnorm_cnn(n: int = 256, seed: int = 0) -> UserCase:
    """A ResNet-style CNN with BatchNorm on 3x8x8 images; data ``(X, y)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = (x.mean(dim=(2, 3)) @ torch.randn(3, 4, generator=gen)).argmax(1)
    model = _seeded(SmallResNet, seed)
    return UserCase("batchnorm_cnn", model, (x, y), F.cross_entropy)


class GRUClassifier(nn.Module):
    """A GRU over a sequence of feature vectors; the last hidden state classifies."""

    def __init__(self, features: int = 6, hidden: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def gru(n: int = 256, seed: int = 0) -> UserCase:
    """A GRU classifier on ``(N, 10, 6)`` sequences; data ``(X, y)``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, 6, generator=gen)
    y = x[:, -3:, :3].sum(1).argmax(1)
    model = _seeded(GRUClassifier, seed)
    return UserCase("gru", model, (x, y), F.cross_entropy)


USER_MODELS: dict[str, Callable[..., UserCase]] = {
    "gpt2": tiny_gpt2,
    "bert_mlm": tiny_bert_mlm,
    "two_input": two_input,
    "padded_lm": padded_lm,
    "batchnorm_cnn": batchnorm_cnn,
    "gru": gru,
}
