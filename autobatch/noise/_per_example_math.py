"""Per-example squared gradient norms of single layers from their inputs and output gradients.

Plain functions over tensors, no hooks. Every layer here computes ``out = f(in) W``-like sums
over positions ``t`` (tokens, pixels, calls of the same layer), so the gradient of one
example's loss with respect to a weight is ``sum_t g_t a_t^T`` (``g_t`` the output gradient,
``a_t`` the input, or the input patch for a convolution). Its squared Frobenius norm is
computed without forming a ``B x P`` tensor where that is cheaper:

- one position: ``|a|^2 |g|^2`` (Goodfellow 2015, "Efficient per-example gradient
  computations");
- several: the Gram form ``sum_{t,t'} (a_t . a_t')(g_t . g_t')`` or the per-example weight
  gradient by a batched matmul, whichever needs fewer multiply-adds (Gray et al. 2024,
  "Normalization layer per-example gradients are sufficient to predict gradient noise scale
  in transformers").

Shapes: ``B`` examples, ``T`` positions, ``p`` input and ``q`` output features. The returned
norms are of the gradient *contributions* seen in one backward (for a mean-reduced loss that
is ``1/B`` times the per-example loss gradient); the caller rescales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "conv_patches",
    "conv_sq_norms",
    "embedding_sq_norms",
    "layer_norm_sq_norms",
    "linear_sq_norms",
    "sum_outer_sq_norms",
]


def sum_outer_sq_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``|sum_t g_t a_t^T|_F^2`` for each example.

    Args:
        a: inputs, shape ``(B, T, p)``.
        g: output gradients, shape ``(B, T, q)``.

    Returns:
        Shape ``(B,)``.
    """
    _, t, p = a.shape
    q = g.shape[-1]
    if t == 1:
        return a.square().sum(dim=(1, 2)) * g.square().sum(dim=(1, 2))
    # Multiply-adds per example: Gram form 2 Gram matrices (T^2 (p + q)); bmm form T p q,
    # plus the squares of the p q result.
    if t * t * (p + q) <= t * p * q + p * q:
        return ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum(dim=(1, 2))
    return torch.bmm(g.transpose(1, 2), a).square().sum(dim=(1, 2))


def linear_sq_norms(
    a: torch.Tensor, g: torch.Tensor, *, weight: bool = True, bias: bool = True
) -> torch.Tensor:
    """``nn.Linear``: squared norms of the weight and bias gradients, summed.

    Args:
        a: inputs ``(B, T, in_features)`` (``T = 1`` for 2-D inputs).
        g: output gradients ``(B, T, out_features)``.
        weight: include the weight (False if it is frozen).
        bias: include the bias (False if there is none or it is frozen).
    """
    out = torch.zeros(a.shape[0], dtype=g.dtype, device=g.device)
    if weight:
        out = out + sum_outer_sq_norms(a, g)
    if bias:
        out = out + g.sum(dim=1).square().sum(dim=1)
    return out


def conv_patches(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input patches a convolution multiplies its weight with: shape
    ``(B, in_channels * prod(kernel_size), L)`` with ``L`` output positions; channel-major as
    in ``weight.flatten(1)``, so groups are consecutive blocks of rows."""
    # Padding first (zeros or the module's padding_mode), then patches with no padding.
    pad = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)  # a 1-D convolution is a 2-D one over a height-1 image
        kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)


def conv_sq_norms(
    module: nn.Conv1d | nn.Conv2d, patches: torch.Tensor, g: torch.Tensor, *, weight: bool, bias: bool
) -> torch.Tensor:
    """``nn.Conv1d`` / ``nn.Conv2d``: squared norms of the weight and bias gradients, summed.

    Args:
        module: the convolution (for its groups).
        patches: :func:`conv_patches` of the input, ``(B, in_channels * K, L)``.
        g: output gradients flattened over positions, ``(B, out_channels, L)``.
    """
    out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if weight:
        groups = module.groups
        rows, cols = patches.shape[1] // groups, g.shape[1] // groups
        for i in range(groups):
            a_i = patches[:, i * rows : (i + 1) * rows].transpose(1, 2)
            g_i = g[:, i * cols : (i + 1) * cols].transpose(1, 2)
            out = out + sum_outer_sq_norms(a_i, g_i)
    if bias:
        out = out + g.sum(dim=2).square().sum(dim=1)
    return out


def embedding_sq_norms(
    tokens: torch.Tensor, g: torch.Tensor, num_embeddings: int, padding_idx: int | None
) -> torch.Tensor:
    """``nn.Embedding``: squared norm of the weight gradient.

    Example ``i``'s gradient has one row per distinct token, the sum of the output gradients
    at that token's positions; rows are summed by a scatter over (example, token) keys, so
    the cost is ``O(B T d)`` whatever the vocabulary.

    Args:
        tokens: indices ``(B, T)``.
        g: output gradients ``(B, T, d)``.
        num_embeddings: vocabulary size.
        padding_idx: a token whose row gets no gradient, or None.
    """
    b, _, d = g.shape
    keys = tokens + num_embeddings * torch.arange(b, device=tokens.device).unsqueeze(1)
    keys, g = keys.reshape(-1), g.reshape(-1, d)
    if padding_idx is not None:
        keep = tokens.reshape(-1) != padding_idx % num_embeddings
        keys, g = keys[keep], g[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(unique.shape[0], d, dtype=g.dtype, device=g.device).index_add_(0, inverse, g)
    out = torch.zeros(b, dtype=g.dtype, device=g.device)
    return out.index_add_(0, unique // num_embeddings, rows.square().sum(dim=1))


def layer_norm_sq_norms(
    module: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, *, weight: bool, bias: bool
) -> torch.Tensor:
    """``nn.LayerNorm``: squared norms of the weight and bias gradients, summed.

    Args:
        module: the layer (for ``normalized_shape`` and ``eps``).
        x: inputs ``(B, T, D)`` with ``D = prod(normalized_shape)``.
        g: output gradients ``(B, T, D)``.
    """
    out = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
    if weight:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        x_hat = (x - mean) * torch.rsqrt(var + module.eps)
        out = out + (g * x_hat).sum(dim=1).square().sum(dim=1)
    if bias:
        out = out + g.sum(dim=1).square().sum(dim=1)
    return out
