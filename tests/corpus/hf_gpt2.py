"""GPT-2 with its language-modelling head as the Flax model hub defines it, tiny configs in
the tests.

Source: https://github.com/huggingface/transformers,
``src/transformers/models/gpt2/modeling_flax_gpt2.py`` as released in transformers 4.46.3
(its PyPI wheel, tag v4.46.3; the last releases ship Flax models).
License: Apache-2.0, Copyright 2021 The Google Flax Team Authors and The HuggingFace Inc. team.

A port of the nn.Module classes (the file depends on the transformers package, which is no
dependency here), re-implemented rather than copied: the same Flax layers with the same
arguments, the same jnp/lax operations in the same order and the same parameter names
(checked against transformers 4.46.3 at JAX 0.10.2: the same primitives with the same
counts, the same logits on the same parameters). Stubbed: ``GPT2Config`` (a frozen
dataclass with the fields the modules read, the library's defaults), ``ACT2FN`` (the
activations the configs name), the output dataclasses (tuples), and
``FlaxGPT2PreTrainedModel.__call__``'s defaults for the inputs a caller leaves out
(:func:`forward`). Left out: cross-attention and the autoregressive cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import combine_masks, make_causal_mask
from flax.linen.attention import dot_product_attention_weights
from jax import lax

#: transformers.modeling_flax_utils.ACT2FN, the entries the corpus configs use.
ACT2FN = {
  "gelu": functools.partial(nn.gelu, approximate=False),
  "relu": nn.relu,
  "gelu_new": functools.partial(nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of transformers.GPT2Config the modules read, with its defaults (and its
  attribute map: hidden_size = n_embd, ...)."""

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  tie_word_embeddings: bool = True

  @property
  def hidden_size(self) -> int:
    return self.n_embd

  @property
  def num_attention_heads(self) -> int:
    return self.n_head

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layer

  @property
  def max_position_embeddings(self) -> int:
    return self.n_positions


class FlaxConv1D(nn.Module):
  """GPT-2's "Conv1D": a dense layer whose kernel is stored [features, in]."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs):
    inputs = jnp.asarray(inputs, self.dtype)
    init = jax.nn.initializers.normal(stddev=0.02)
    kernel = self.param("kernel", init, (self.features, inputs.shape[-1]))
    kernel = jnp.asarray(kernel.transpose(), self.dtype)
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    y = lax.dot_general(inputs, kernel, dims, precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", jax.nn.initializers.zeros, (self.features,))
      y = y + jnp.asarray(bias, self.dtype)
    return y


class FlaxGPT2Attention(nn.Module):
  """Causal multi-head self-attention: one fused q/k/v projection split in three."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32
  causal: bool = True

  def setup(self):
    cfg = self.config
    self.embed_dim = cfg.hidden_size
    self.num_heads = cfg.num_attention_heads
    self.head_dim = self.embed_dim // self.num_heads
    self.c_attn = FlaxConv1D(3 * self.embed_dim, dtype=self.dtype)
    self.c_proj = FlaxConv1D(self.embed_dim, dtype=self.dtype)
    self.resid_dropout = nn.Dropout(rate=cfg.resid_pdrop)
    if self.causal:
      ones = jnp.ones((1, cfg.max_position_embeddings), dtype="bool")
      self.causal_mask = make_causal_mask(ones, dtype="bool")

  def _split_heads(self, hidden):
    return hidden.reshape(hidden.shape[:2] + (self.num_heads, self.head_dim))

  def _merge_heads(self, hidden):
    return hidden.reshape(hidden.shape[:2] + (self.embed_dim,))

  def __call__(self, hidden_states, attention_mask=None, deterministic=True):
    batch_size = hidden_states.shape[0]
    qkv = self.c_attn(hidden_states)
    query, key, value = jnp.split(qkv, 3, axis=2)
    query = self._split_heads(query)
    key = self._split_heads(key)
    value = self._split_heads(value)
    q_len, k_len = query.shape[1], key.shape[1]
    if self.causal:
      causal_mask = self.causal_mask[:, :, :q_len, :k_len]
      causal_mask = jnp.broadcast_to(causal_mask, (batch_size,) + causal_mask.shape[1:])
    if attention_mask is not None and self.causal:
      attention_mask = jnp.broadcast_to(
        jnp.expand_dims(attention_mask, axis=(-3, -2)), causal_mask.shape
      )
      attention_mask = combine_masks(attention_mask, causal_mask)
    elif self.causal:
      attention_mask = causal_mask
    elif attention_mask is not None:
      attention_mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
    dropout_rng = None
    if not deterministic and self.config.attn_pdrop > 0.0:
      dropout_rng = self.make_rng("dropout")
    if attention_mask is not None:
      bias = lax.select(
        attention_mask > 0,
        jnp.full(attention_mask.shape, 0.0).astype(self.dtype),
        jnp.full(attention_mask.shape, jnp.finfo(self.dtype).min).astype(self.dtype),
      )
    else:
      bias = None
    weights = dot_product_attention_weights(
      query,
      key,
      bias=bias,
      dropout_rng=dropout_rng,
      dropout_rate=self.config.attn_pdrop,
      deterministic=deterministic,
      dtype=self.dtype,
      precision=None,
    )
    out = jnp.einsum("...hqk,...khd->...qhd", weights, value)
    out = self._merge_heads(out)
    out = self.c_proj(out)
    return (self.resid_dropout(out, deterministic=deterministic),)


class FlaxGPT2MLP(nn.Module):
  config: GPT2Config
  intermediate_size: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.c_fc = FlaxConv1D(self.intermediate_size, dtype=self.dtype)
    self.c_proj = FlaxConv1D(self.config.hidden_size, dtype=self.dtype)
    self.act = ACT2FN[self.config.activation_function]
    self.dropout = nn.Dropout(rate=self.config.resid_pdrop)

  def __call__(self, hidden_states, deterministic=True):
    hidden = self.act(self.c_fc(hidden_states))
    hidden = self.c_proj(hidden)
    return self.dropout(hidden, deterministic=deterministic)


class FlaxGPT2Block(nn.Module):
  """Pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    inner = cfg.n_inner if cfg.n_inner is not None else 4 * cfg.hidden_size
    self.ln_1 = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype)
    self.attn = FlaxGPT2Attention(cfg, dtype=self.dtype)
    self.ln_2 = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype)
    self.mlp = FlaxGPT2MLP(cfg, inner, dtype=self.dtype)

  def __call__(self, hidden_states, attention_mask=None, deterministic=True):
    residual = hidden_states
    attn = self.attn(self.ln_1(hidden_states), attention_mask, deterministic)[0]
    hidden = attn + residual
    residual = hidden
    ff = self.mlp(self.ln_2(hidden), deterministic=deterministic)
    return (residual + ff,)


class FlaxGPT2BlockCollection(nn.Module):
  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    n = self.config.num_hidden_layers
    self.blocks = [FlaxGPT2Block(self.config, name=str(i), dtype=self.dtype) for i in range(n)]

  def __call__(self, hidden_states, attention_mask=None, deterministic=True):
    for block in self.blocks:
      hidden_states = block(hidden_states, attention_mask, deterministic=deterministic)[0]
    return (hidden_states,)


class FlaxGPT2Module(nn.Module):
  """Token + position embeddings, the blocks, a final LayerNorm."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    init = jax.nn.initializers.normal(stddev=cfg.initializer_range)
    self.wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype)
    self.wpe = nn.Embed(
      cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, dtype=self.dtype
    )
    self.dropout = nn.Dropout(rate=cfg.embd_pdrop)
    self.h = FlaxGPT2BlockCollection(cfg, dtype=self.dtype)
    self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype)

  def __call__(self, input_ids, attention_mask, position_ids, deterministic=True):
    hidden = self.wte(input_ids.astype("i4")) + self.wpe(position_ids.astype("i4"))
    hidden = self.dropout(hidden, deterministic=deterministic)
    hidden = self.h(hidden, attention_mask, deterministic=deterministic)[0]
    return (self.ln_f(hidden),)


class FlaxGPT2LMHeadModule(nn.Module):
  """ids [B, L] -> (logits [B, L, vocab_size],): the head tied to ``wte`` by default."""

  config: GPT2Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.transformer = FlaxGPT2Module(cfg, dtype=self.dtype)
    self.lm_head = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=jax.nn.initializers.normal(stddev=cfg.initializer_range),
    )

  def __call__(
    self,
    input_ids,
    attention_mask,
    position_ids,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    deterministic=True,
  ):
    if encoder_hidden_states is not None or encoder_attention_mask is not None:
      raise ValueError("encoder_hidden_states: cross-attention is not part of this port.")
    outputs = self.transformer(input_ids, attention_mask, position_ids, deterministic)
    hidden = outputs[0]
    if self.config.tie_word_embeddings:
      kernel = self.transformer.variables["params"]["wte"]["embedding"].T
      logits = self.lm_head.apply({"params": {"kernel": kernel}}, hidden)
    else:
      logits = self.lm_head(hidden)
    return (logits,) + outputs[1:]


def forward(module: FlaxGPT2LMHeadModule, params, input_ids, train: bool = False):
  """``FlaxGPT2LMHeadModel.__call__(input_ids)``: positions 0..L-1 and an all-ones
  attention mask when left out, as int32."""
  batch_size, length = input_ids.shape
  position_ids = jnp.broadcast_to(jnp.arange(length)[None, :], (batch_size, length))
  attention_mask = jnp.ones((batch_size, length))
  return module.apply(
    {"params": params},
    jnp.array(input_ids, dtype="i4"),
    jnp.array(attention_mask, dtype="i4"),
    jnp.array(position_ids, dtype="i4"),
    None,
    None,
    not train,
  )
