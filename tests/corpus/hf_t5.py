"""T5 for conditional generation (encoder-decoder) as the Flax model hub defines it, tiny
configs in the tests.

Source: https://github.com/huggingface/transformers,
``src/transformers/models/t5/modeling_flax_t5.py`` as released in transformers 4.46.3
(its PyPI wheel, tag v4.46.3; the last releases ship Flax models).
License: Apache-2.0, Copyright 2021 T5 Authors and HuggingFace Inc. team.

A port of the nn.Module classes (the file depends on the transformers package, which is no
dependency here), re-implemented rather than copied: the same Flax layers with the same
arguments, the same jnp/lax operations in the same order and the same parameter names
(checked against transformers 4.46.3 at JAX 0.10.2: the same primitives with the same
counts, the same logits on the same parameters). One change: the original's
``jnp.clip(x, a_max=m)`` no longer runs on current JAX (the keyword was removed; the
original raises TypeError), so it is written ``jnp.clip(x, max=m)``, the same operation.
Stubbed: ``T5Config`` (a frozen dataclass with the fields the modules read, the library's
defaults, ``causal`` set per stack by ``dataclasses.replace`` where the original deep-copies
the config), ``ACT2FN`` (the activations the configs name), the output dataclasses (tuples),
and ``FlaxT5PreTrainedModel.__call__``'s defaults (:func:`forward`). Left out: the
autoregressive cache, gradient checkpointing, the encoder-only model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import combine_masks, make_causal_mask
from flax.linen.attention import dot_product_attention_weights

#: transformers.modeling_flax_utils.ACT2FN, the entries the corpus configs use.
ACT2FN = {
  "gelu": functools.partial(nn.gelu, approximate=False),
  "relu": nn.relu,
  "gelu_new": functools.partial(nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of transformers.T5Config the modules read, with its defaults;
  ``feed_forward_proj`` 'relu' (T5) or 'gated-gelu' (T5 v1.1, Flan-T5)."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  initializer_factor: float = 1.0
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  causal: bool = False

  @property
  def is_gated_act(self) -> bool:
    return self.feed_forward_proj.split("-")[0] == "gated"

  @property
  def dense_act_fn(self) -> str:
    act = self.feed_forward_proj.split("-")[-1]
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act


class FlaxT5LayerNorm(nn.Module):
  """RMS norm: weight * x / sqrt(mean(x^2) + eps) (no mean, no bias)."""

  hidden_size: int
  dtype: jnp.dtype = jnp.float32
  eps: float = 1e-6
  weight_init: Callable[..., np.ndarray] = jax.nn.initializers.ones

  def setup(self):
    self.weight = self.param("weight", self.weight_init, (self.hidden_size,))

  def __call__(self, hidden_states):
    variance = jnp.power(hidden_states.astype("f4"), 2).mean(axis=-1, keepdims=True)
    hidden_states = hidden_states / jnp.sqrt(variance + self.eps)
    return self.weight * hidden_states


def _normal(std: float):
  return jax.nn.initializers.normal(std)


class FlaxT5DenseActDense(nn.Module):
  """wo(dropout(act(wi(x))))."""

  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    wi_std = cfg.initializer_factor * (cfg.d_model**-0.5)
    wo_std = cfg.initializer_factor * (cfg.d_ff**-0.5)
    self.wi = nn.Dense(cfg.d_ff, use_bias=False, kernel_init=_normal(wi_std), dtype=self.dtype)
    self.wo = nn.Dense(cfg.d_model, use_bias=False, kernel_init=_normal(wo_std), dtype=self.dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.act = ACT2FN[cfg.dense_act_fn]

  def __call__(self, hidden_states, deterministic=True):
    hidden = self.act(self.wi(hidden_states))
    hidden = self.dropout(hidden, deterministic=deterministic)
    return self.wo(hidden)


class FlaxT5DenseGatedActDense(nn.Module):
  """wo(dropout(act(wi_0(x)) * wi_1(x))): a GLU."""

  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    wi_std = cfg.initializer_factor * (cfg.d_model**-0.5)
    wo_std = cfg.initializer_factor * (cfg.d_ff**-0.5)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    self.wi_0 = dense(cfg.d_ff, kernel_init=_normal(wi_std))
    self.wi_1 = dense(cfg.d_ff, kernel_init=_normal(wi_std))
    self.wo = dense(cfg.d_model, kernel_init=_normal(wo_std))
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.act = ACT2FN[cfg.dense_act_fn]

  def __call__(self, hidden_states, deterministic):
    gate = self.act(self.wi_0(hidden_states))
    linear = self.wi_1(hidden_states)
    hidden = gate * linear
    hidden = self.dropout(hidden, deterministic=deterministic)
    return self.wo(hidden)


class FlaxT5LayerFF(nn.Module):
  """x + dropout(FF(RMSNorm(x)))."""

  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    ff = FlaxT5DenseGatedActDense if cfg.is_gated_act else FlaxT5DenseActDense
    self.DenseReluDense = ff(cfg, dtype=self.dtype)
    self.layer_norm = FlaxT5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=self.dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, hidden_states, deterministic=True):
    forwarded = self.layer_norm(hidden_states)
    forwarded = self.DenseReluDense(forwarded, deterministic=deterministic)
    return hidden_states + self.dropout(forwarded, deterministic=deterministic)


class FlaxT5Attention(nn.Module):
  """Multi-head attention with T5's bucketed relative position bias (first layer of a
  stack), no 1/sqrt(d) scaling (undone on the query), masks as additive biases."""

  config: T5Config
  has_relative_attention_bias: bool = False
  causal: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.relative_attention_num_buckets = cfg.relative_attention_num_buckets
    self.relative_attention_max_distance = cfg.relative_attention_max_distance
    self.d_model = cfg.d_model
    self.key_value_proj_dim = cfg.d_kv
    self.n_heads = cfg.num_heads
    self.dropout = cfg.dropout_rate
    self.inner_dim = self.n_heads * self.key_value_proj_dim
    q_std = cfg.initializer_factor * ((self.inner_dim * self.key_value_proj_dim) ** -0.5)
    kv_std = cfg.initializer_factor * (self.inner_dim**-0.5)
    o_std = cfg.initializer_factor * (self.inner_dim**-0.5)
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    self.q = dense(self.inner_dim, kernel_init=_normal(q_std))
    self.k = dense(self.inner_dim, kernel_init=_normal(kv_std))
    self.v = dense(self.inner_dim, kernel_init=_normal(kv_std))
    self.o = dense(self.d_model, kernel_init=_normal(o_std))
    if self.has_relative_attention_bias:
      self.relative_attention_bias = nn.Embed(
        self.relative_attention_num_buckets,
        self.n_heads,
        embedding_init=_normal(kv_std),
        dtype=self.dtype,
      )

  @staticmethod
  def _relative_position_bucket(
    relative_position, bidirectional=True, num_buckets=32, max_distance=128
  ):
    """Bucket of each relative position (memory - query): exact below half the buckets,
    logarithmic up to ``max_distance`` (Mesh TensorFlow's rule)."""
    buckets = 0
    if bidirectional:
      num_buckets //= 2
      buckets += (relative_position > 0) * num_buckets
      relative_position = jnp.abs(relative_position)
    else:
      relative_position = -jnp.clip(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
      jnp.log(relative_position / max_exact)
      / jnp.log(max_distance / max_exact)
      * (num_buckets - max_exact)
    )
    if_large = jnp.clip(if_large, max=num_buckets - 1)
    buckets += jnp.where(is_small, relative_position, if_large)
    return buckets.astype("i4")

  def compute_bias(self, query_length, key_length):
    """The relative position bias [1, heads, q, k]."""
    context = jnp.arange(query_length, dtype="i4")[:, None]
    memory = jnp.arange(key_length, dtype="i4")[None, :]
    bucket = self._relative_position_bucket(
      memory - context,
      bidirectional=(not self.causal),
      num_buckets=self.relative_attention_num_buckets,
      max_distance=self.relative_attention_max_distance,
    )
    values = self.relative_attention_bias(bucket)
    return values.transpose((2, 0, 1))[None, :, :, :]

  def _split_heads(self, hidden):
    return hidden.reshape(hidden.shape[:2] + (self.n_heads, self.key_value_proj_dim))

  def _merge_heads(self, hidden):
    return hidden.reshape(hidden.shape[:2] + (self.inner_dim,))

  def _create_position_bias(self, key_states, query_states, attention_mask):
    key_length, query_length = key_states.shape[1], query_states.shape[1]
    if self.has_relative_attention_bias:
      return self.compute_bias(query_length, key_length)
    if attention_mask is not None:
      return jnp.zeros_like(attention_mask)
    return jnp.zeros((1, self.n_heads, query_length, key_length), dtype=self.dtype)

  def __call__(
    self,
    hidden_states,
    attention_mask=None,
    key_value_states=None,
    position_bias=None,
    deterministic=True,
  ):
    batch_size = hidden_states.shape[0]
    kv = hidden_states if key_value_states is None else key_value_states
    query = self._split_heads(self.q(hidden_states))
    key = self._split_heads(self.k(kv))
    value = self._split_heads(self.v(kv))
    query *= jnp.sqrt(query.shape[-1])  # undoes dot_product_attention_weights' scaling
    if self.causal:
      causal_mask = make_causal_mask(attention_mask, dtype="bool")
      causal_mask = jnp.broadcast_to(causal_mask, (batch_size,) + causal_mask.shape[1:])
      attention_mask = jnp.broadcast_to(
        jnp.expand_dims(attention_mask, axis=(-3, -2)), causal_mask.shape
      )
      attention_mask = combine_masks(attention_mask, causal_mask)
    elif attention_mask is not None:
      attention_mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
    if attention_mask is not None:
      attention_mask = jax.lax.select(
        attention_mask > 0,
        jnp.full(attention_mask.shape, 0.0).astype(self.dtype),
        jnp.full(attention_mask.shape, jnp.finfo(self.dtype).min).astype(self.dtype),
      )
    if position_bias is None:
      position_bias = self._create_position_bias(key, query, attention_mask)
      if attention_mask is not None:
        position_bias = position_bias + attention_mask
    dropout_rng = None
    if not deterministic and self.dropout > 0.0:
      dropout_rng = self.make_rng("dropout")
    weights = dot_product_attention_weights(
      query,
      key,
      bias=position_bias,
      dropout_rng=dropout_rng,
      dropout_rate=self.dropout,
      broadcast_dropout=True,
      deterministic=deterministic,
      dtype=self.dtype,
    )
    out = jnp.einsum("...hqk,...khd->...qhd", weights, value)
    out = self.o(self._merge_heads(out))
    return (out, position_bias)


class FlaxT5LayerSelfAttention(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.SelfAttention = FlaxT5Attention(
      cfg,
      has_relative_attention_bias=self.has_relative_attention_bias,
      causal=cfg.causal,
      dtype=self.dtype,
    )
    self.layer_norm = FlaxT5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=self.dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, hidden_states, attention_mask=None, position_bias=None, deterministic=True):
    normed = self.layer_norm(hidden_states)
    attn = self.SelfAttention(
      normed,
      attention_mask=attention_mask,
      position_bias=position_bias,
      deterministic=deterministic,
    )
    hidden = hidden_states + self.dropout(attn[0], deterministic=deterministic)
    return (hidden,) + attn[1:]


class FlaxT5LayerCrossAttention(nn.Module):
  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.EncDecAttention = FlaxT5Attention(
      cfg, has_relative_attention_bias=False, causal=False, dtype=self.dtype
    )
    self.layer_norm = FlaxT5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=self.dtype)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(
    self,
    hidden_states,
    key_value_states,
    attention_mask=None,
    position_bias=None,
    deterministic=True,
  ):
    normed = self.layer_norm(hidden_states)
    attn = self.EncDecAttention(
      normed,
      attention_mask=attention_mask,
      key_value_states=key_value_states,
      position_bias=position_bias,
    )
    hidden = hidden_states + self.dropout(attn[0], deterministic=deterministic)
    return (hidden,) + attn[1:]


class FlaxT5Block(nn.Module):
  """Self-attention, cross-attention (decoder), feed-forward; returns (hidden, position
  bias[, encoder-decoder position bias])."""

  config: T5Config
  has_relative_attention_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.causal = cfg.causal
    self.layer = (
      FlaxT5LayerSelfAttention(
        cfg,
        has_relative_attention_bias=self.has_relative_attention_bias,
        name=str(0),
        dtype=self.dtype,
      ),
    )
    ff_index = 1
    if self.causal:
      self.layer += (FlaxT5LayerCrossAttention(cfg, name=str(1), dtype=self.dtype),)
      ff_index += 1
    self.layer += (FlaxT5LayerFF(cfg, name=str(ff_index), dtype=self.dtype),)

  def __call__(
    self,
    hidden_states,
    attention_mask=None,
    position_bias=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    encoder_decoder_position_bias=None,
    deterministic=True,
  ):
    self_outputs = self.layer[0](
      hidden_states,
      attention_mask=attention_mask,
      position_bias=position_bias,
      deterministic=deterministic,
    )
    hidden_states = self_outputs[0]
    attention_outputs = self_outputs[1:]
    if self.causal and encoder_hidden_states is not None:
      cross = self.layer[1](
        hidden_states,
        key_value_states=encoder_hidden_states,
        attention_mask=encoder_attention_mask,
        position_bias=encoder_decoder_position_bias,
        deterministic=deterministic,
      )
      hidden_states = cross[0]
      attention_outputs = attention_outputs + cross[1:]
    hidden_states = self.layer[-1](hidden_states, deterministic=deterministic)
    return (hidden_states,) + attention_outputs


class FlaxT5LayerCollection(nn.Module):
  config: T5Config
  has_relative_attention_bias: bool
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.layer = FlaxT5Block(
      self.config, has_relative_attention_bias=self.has_relative_attention_bias, dtype=self.dtype
    )

  def __call__(self, *args, **kwargs):
    return self.layer(*args, **kwargs)


class FlaxT5BlockCollection(nn.Module):
  """The stack's blocks; the first computes the relative position bias, the rest reuse it."""

  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.causal = cfg.causal
    self.blocks = [
      FlaxT5LayerCollection(
        cfg, has_relative_attention_bias=(i == 0), dtype=self.dtype, name=str(i)
      )
      for i in range(cfg.num_layers)
    ]

  def __call__(
    self,
    hidden_states=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    deterministic=True,
  ):
    position_bias = None
    encoder_decoder_position_bias = None
    for block in self.blocks:
      outputs = block(
        hidden_states,
        attention_mask,
        position_bias,
        encoder_hidden_states,
        encoder_attention_mask,
        encoder_decoder_position_bias,
        deterministic,
      )
      hidden_states = outputs[0]
      position_bias = outputs[1]
      if self.causal and encoder_hidden_states is not None:
        encoder_decoder_position_bias = outputs[2]
    return (hidden_states,)


class FlaxT5Stack(nn.Module):
  """Embedding (shared module), blocks, final RMS norm."""

  config: T5Config
  embed_tokens: nn.Embed
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.causal = cfg.causal
    self.block = FlaxT5BlockCollection(cfg, dtype=self.dtype)
    self.final_layer_norm = FlaxT5LayerNorm(
      cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=self.dtype
    )
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(
    self,
    input_ids=None,
    attention_mask=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    deterministic=True,
  ):
    hidden = self.embed_tokens(input_ids)
    hidden = self.dropout(hidden, deterministic=deterministic)
    hidden = self.block(
      hidden,
      attention_mask=attention_mask,
      encoder_hidden_states=encoder_hidden_states,
      encoder_attention_mask=encoder_attention_mask,
      deterministic=deterministic,
    )[0]
    hidden = self.final_layer_norm(hidden)
    return (self.dropout(hidden, deterministic=deterministic),)


class FlaxT5ForConditionalGenerationModule(nn.Module):
  """(input ids [B, Ls], decoder input ids [B, Lt], masks) -> (logits [B, Lt, vocab],)."""

  config: T5Config
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.model_dim = cfg.d_model
    self.shared = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      embedding_init=_normal(cfg.initializer_factor),
      dtype=self.dtype,
    )
    encoder_config = dataclasses.replace(cfg, causal=False)
    self.encoder = FlaxT5Stack(encoder_config, self.shared, dtype=self.dtype)
    n_dec = cfg.num_decoder_layers if cfg.num_decoder_layers is not None else cfg.num_layers
    decoder_config = dataclasses.replace(cfg, causal=True, num_layers=n_dec)
    self.decoder = FlaxT5Stack(decoder_config, self.shared, dtype=self.dtype)
    self.lm_head = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      kernel_init=_normal(cfg.initializer_factor),
      dtype=self.dtype,
    )

  def __call__(
    self,
    input_ids=None,
    attention_mask=None,
    decoder_input_ids=None,
    decoder_attention_mask=None,
    deterministic=True,
  ):
    encoded = self.encoder(
      input_ids=input_ids, attention_mask=attention_mask, deterministic=deterministic
    )[0]
    decoded = self.decoder(
      input_ids=decoder_input_ids,
      attention_mask=decoder_attention_mask,
      encoder_hidden_states=encoded,
      encoder_attention_mask=attention_mask,
      deterministic=deterministic,
    )
    sequence_output = decoded[0]
    if self.config.tie_word_embeddings:
      sequence_output = sequence_output * (self.model_dim**-0.5)
      shared = self.shared.variables["params"]["embedding"]
      logits = self.lm_head.apply({"params": {"kernel": shared.T}}, sequence_output)
    else:
      logits = self.lm_head(sequence_output)
    return (logits,) + decoded[1:] + (encoded,)


def forward(
  module: FlaxT5ForConditionalGenerationModule,
  params,
  input_ids,
  decoder_input_ids,
  train: bool = False,
):
  """``FlaxT5ForConditionalGeneration.__call__(input_ids, decoder_input_ids=...)``: all-ones
  attention masks when left out, as int32."""
  attention_mask = jnp.ones_like(input_ids)
  decoder_attention_mask = jnp.ones_like(decoder_input_ids)
  return module.apply(
    {"params": params},
    input_ids=jnp.array(input_ids, dtype="i4"),
    attention_mask=jnp.array(attention_mask, dtype="i4"),
    decoder_input_ids=jnp.array(decoder_input_ids, dtype="i4"),
    decoder_attention_mask=jnp.array(decoder_attention_mask, dtype="i4"),
    deterministic=not train,
  )
