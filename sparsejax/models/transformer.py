"""Transformer blocks of the zoo's ViT and GPT: pre-norm residual blocks of multi-head
self-attention and a GELU MLP (plain Flax linen).

The heads are reshapes of the query, key and value projections: each is a Dense
[width, width] whose output columns ``h * d : (h + 1) * d`` are head h (d = width /
heads), and the output projection's rows of the same range read head h. So a head is a
block of columns of q/k/v and of rows of the output kernel, which is what the
connectivity transform and head pruning see.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Kernels of the attention and MLP projections: GPT-2's and BERT's normal(0.02).
kernel_init = nn.initializers.normal(0.02)


def check_heads(width: int, heads: int) -> int:
  """The head size ``width // heads``; ValueError unless ``heads`` divides ``width``."""
  if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
    raise ValueError(
      f"heads={heads!r} must be a positive integer that divides the width {width} "
      "(each head has width // heads features)."
    )
  return width // heads


class SelfAttention(nn.Module):
  """Multi-head self-attention, [B, T, W] -> [B, T, W].

  ``q, k, v = x Wq + bq, x Wk + bk, x Wv + bv`` (Dense 'query', 'key', 'value', kernels
  [W, W]), each reshaped to [B, T, H, D] with D = W / H;
  ``A_h = softmax(q_h k_h^T / sqrt(D))`` over the keys (with ``causal``, key j > query
  i is excluded); ``y = concat_h(A_h v_h) Wo + bo`` (Dense 'out').

  Attributes:
    heads: H (divides W).
    causal: a decoder's mask: position i attends to positions <= i.
    out_init: the output projection's kernel initializer (GPT-2 scales it by depth).
  """

  heads: int
  causal: bool = False
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, w = x.shape
    d = check_heads(w, self.heads)
    split = lambda y: y.reshape(b, t, self.heads, d)
    q = split(nn.Dense(w, kernel_init=kernel_init, name="query")(x))
    k = split(nn.Dense(w, kernel_init=kernel_init, name="key")(x))
    v = split(nn.Dense(w, kernel_init=kernel_init, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(d, x.dtype))
    if self.causal:
      allowed = jnp.tril(jnp.ones((t, t), bool))
      logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, w)
    return nn.Dense(w, kernel_init=self.out_init, name="out")(y)


class MLP(nn.Module):
  """[B, T, W] -> [B, T, W]: ``gelu(x W1 + b1) W2 + b2`` (Dense 'fc' [W, hidden], Dense
  'proj' [hidden, W])."""

  hidden: int
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(nn.Dense(self.hidden, kernel_init=kernel_init, name="fc")(x))
    return nn.Dense(x.shape[-1], kernel_init=self.out_init, name="proj")(h)


class Block(nn.Module):
  """Pre-norm residual block, [B, T, W] -> [B, T, W]:
  ``x + attention(LN(x))``, then ``x + MLP(LN(x))`` (LayerNorm 'norm_attention',
  'norm_mlp'; :class:`SelfAttention` 'attention', :class:`MLP` 'mlp' with hidden width
  ``mlp_ratio * W``)."""

  heads: int
  mlp_ratio: int = 4
  causal: bool = False
  out_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    attention = SelfAttention(self.heads, self.causal, self.out_init, name="attention")
    x = x + attention(nn.LayerNorm(name="norm_attention")(x))
    mlp = MLP(self.mlp_ratio * x.shape[-1], self.out_init, name="mlp")
    return x + mlp(nn.LayerNorm(name="norm_mlp")(x))
