"""BERT for masked language modelling as the Flax model hub defines it, tiny configs in the
tests.

Source: https://github.com/huggingface/transformers,
``src/transformers/models/bert/modeling_flax_bert.py`` as released in transformers 4.46.3
(its PyPI wheel, tag v4.46.3; the last releases ship Flax models).
License: Apache-2.0, Copyright 2021 The Google Flax Team Authors and The HuggingFace Inc. team.

A port of the nn.Module classes (the file depends on the transformers package, which is no
dependency here), re-implemented rather than copied: the same Flax layers with the same
arguments, the same jnp/lax operations in the same order and the same parameter names
(checked against transformers 4.46.3 at JAX 0.10.2: the same primitives with the same
counts, the same logits on the same parameters). Stubbed: ``BertConfig`` (a frozen
dataclass with the fields the modules read, the library's defaults), ``ACT2FN`` (the
activations the configs name), the output dataclasses (tuples, as with
``return_dict=False``), and ``FlaxBertPreTrainedModel.__call__``'s defaults for the inputs
a caller leaves out (:func:`forward`). Left out: the decoder paths (``is_decoder``,
cross-attention, the autoregressive cache), gradient checkpointing, the other heads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.attention import dot_product_attention_weights
from jax import lax

#: transformers.modeling_flax_utils.ACT2FN, the entries the corpus configs use.
ACT2FN = {
  "gelu": functools.partial(nn.gelu, approximate=False),
  "relu": nn.relu,
  "gelu_new": functools.partial(nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of transformers.BertConfig the modules read, with its defaults."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  tie_word_embeddings: bool = True


def _normal(config: BertConfig):
  return jax.nn.initializers.normal(stddev=config.initializer_range)


class FlaxBertEmbeddings(nn.Module):
  """Word + token type + position embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.word_embeddings = nn.Embed(
      cfg.vocab_size, cfg.hidden_size, embedding_init=_normal(cfg), dtype=self.dtype
    )
    self.position_embeddings = nn.Embed(
      cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_normal(cfg), dtype=self.dtype
    )
    self.token_type_embeddings = nn.Embed(
      cfg.type_vocab_size, cfg.hidden_size, embedding_init=_normal(cfg), dtype=self.dtype
    )
    self.LayerNorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

  def __call__(self, input_ids, token_type_ids, position_ids, attention_mask, deterministic=True):
    words = self.word_embeddings(input_ids.astype("i4"))
    positions = self.position_embeddings(position_ids.astype("i4"))
    token_types = self.token_type_embeddings(token_type_ids.astype("i4"))
    hidden = words + token_types + positions
    hidden = self.LayerNorm(hidden)
    return self.dropout(hidden, deterministic=deterministic)


class FlaxBertSelfAttention(nn.Module):
  """Multi-head self-attention: query/key/value Dense, the padding mask as a bias, the
  head mask scaling each head's weights."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.head_dim = cfg.hidden_size // cfg.num_attention_heads
    if cfg.hidden_size % cfg.num_attention_heads != 0:
      raise ValueError(
        f"config.hidden_size={cfg.hidden_size} must be a multiple of "
        f"config.num_attention_heads={cfg.num_attention_heads}"
      )
    dense = functools.partial(nn.Dense, cfg.hidden_size, dtype=self.dtype, kernel_init=_normal(cfg))
    self.query, self.key, self.value = dense(), dense(), dense()

  def _split_heads(self, hidden):
    cfg = self.config
    return hidden.reshape(hidden.shape[:2] + (cfg.num_attention_heads, self.head_dim))

  def __call__(self, hidden_states, attention_mask, layer_head_mask, deterministic=True):
    cfg = self.config
    query = self._split_heads(self.query(hidden_states))
    key = self._split_heads(self.key(hidden_states))
    value = self._split_heads(self.value(hidden_states))
    if attention_mask is not None:
      attention_mask = jnp.expand_dims(attention_mask, axis=(-3, -2))
      bias = lax.select(
        attention_mask > 0,
        jnp.full(attention_mask.shape, 0.0).astype(self.dtype),
        jnp.full(attention_mask.shape, jnp.finfo(self.dtype).min).astype(self.dtype),
      )
    else:
      bias = None
    dropout_rng = None
    if not deterministic and cfg.attention_probs_dropout_prob > 0.0:
      dropout_rng = self.make_rng("dropout")
    weights = dot_product_attention_weights(
      query,
      key,
      bias=bias,
      dropout_rng=dropout_rng,
      dropout_rate=cfg.attention_probs_dropout_prob,
      broadcast_dropout=True,
      deterministic=deterministic,
      dtype=self.dtype,
      precision=None,
    )
    if layer_head_mask is not None:
      weights = jnp.einsum("...hqk,h->...hqk", weights, layer_head_mask)
    out = jnp.einsum("...hqk,...khd->...qhd", weights, value)
    return (out.reshape(out.shape[:2] + (-1,)),)


class FlaxBertSelfOutput(nn.Module):
  """LayerNorm(Dense(attention output) + residual)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_normal(cfg), dtype=self.dtype)
    self.LayerNorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

  def __call__(self, hidden_states, input_tensor, deterministic=True):
    hidden = self.dense(hidden_states)
    hidden = self.dropout(hidden, deterministic=deterministic)
    return self.LayerNorm(hidden + input_tensor)


class FlaxBertAttention(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.self = FlaxBertSelfAttention(self.config, dtype=self.dtype)
    self.output = FlaxBertSelfOutput(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, attention_mask, layer_head_mask, deterministic=True):
    attn = self.self(hidden_states, attention_mask, layer_head_mask, deterministic=deterministic)
    return (self.output(attn[0], hidden_states, deterministic=deterministic),)


class FlaxBertIntermediate(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.intermediate_size, kernel_init=_normal(cfg), dtype=self.dtype)
    self.activation = ACT2FN[cfg.hidden_act]

  def __call__(self, hidden_states):
    return self.activation(self.dense(hidden_states))


class FlaxBertOutput(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_normal(cfg), dtype=self.dtype)
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)
    self.LayerNorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)

  def __call__(self, hidden_states, attention_output, deterministic=True):
    hidden = self.dense(hidden_states)
    hidden = self.dropout(hidden, deterministic=deterministic)
    return self.LayerNorm(hidden + attention_output)


class FlaxBertLayer(nn.Module):
  """Post-norm encoder layer: attention, then the feed-forward block."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.attention = FlaxBertAttention(self.config, dtype=self.dtype)
    self.intermediate = FlaxBertIntermediate(self.config, dtype=self.dtype)
    self.output = FlaxBertOutput(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, attention_mask, layer_head_mask, deterministic=True):
    attn = self.attention(hidden_states, attention_mask, layer_head_mask, deterministic)[0]
    hidden = self.intermediate(attn)
    return (self.output(hidden, attn, deterministic=deterministic),)


class FlaxBertLayerCollection(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    n = self.config.num_hidden_layers
    self.layers = [FlaxBertLayer(self.config, name=str(i), dtype=self.dtype) for i in range(n)]

  def __call__(self, hidden_states, attention_mask, head_mask, deterministic=True):
    if head_mask is not None and head_mask.shape[0] != len(self.layers):
      raise ValueError(
        f"head_mask has {head_mask.shape[0]} layers; the model has {len(self.layers)}."
      )
    for i, layer in enumerate(self.layers):
      layer_head_mask = head_mask[i] if head_mask is not None else None
      hidden_states = layer(hidden_states, attention_mask, layer_head_mask, deterministic)[0]
    return (hidden_states,)


class FlaxBertEncoder(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.layer = FlaxBertLayerCollection(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, attention_mask, head_mask, deterministic=True):
    return self.layer(hidden_states, attention_mask, head_mask, deterministic=deterministic)


class FlaxBertPooler(nn.Module):
  """tanh(Dense(the first token's hidden state))."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_normal(cfg), dtype=self.dtype)

  def __call__(self, hidden_states):
    return nn.tanh(self.dense(hidden_states[:, 0]))


class FlaxBertPredictionHeadTransform(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, dtype=self.dtype)
    self.activation = ACT2FN[cfg.hidden_act]
    self.LayerNorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)

  def __call__(self, hidden_states):
    return self.LayerNorm(self.activation(self.dense(hidden_states)))


class FlaxBertLMPredictionHead(nn.Module):
  """Transform, then the vocabulary projection: the word embedding's transpose when tied
  (applied through the ``decoder`` Dense), plus a bias."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  bias_init: Callable[..., np.ndarray] = jax.nn.initializers.zeros

  def setup(self):
    cfg = self.config
    self.transform = FlaxBertPredictionHeadTransform(cfg, dtype=self.dtype)
    self.decoder = nn.Dense(cfg.vocab_size, dtype=self.dtype, use_bias=False)
    self.bias = self.param("bias", self.bias_init, (cfg.vocab_size,))

  def __call__(self, hidden_states, shared_embedding=None):
    hidden = self.transform(hidden_states)
    if shared_embedding is not None:
      hidden = self.decoder.apply({"params": {"kernel": shared_embedding.T}}, hidden)
    else:
      hidden = self.decoder(hidden)
    hidden += jnp.asarray(self.bias, self.dtype)
    return hidden


class FlaxBertOnlyMLMHead(nn.Module):
  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.predictions = FlaxBertLMPredictionHead(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, shared_embedding=None):
    return self.predictions(hidden_states, shared_embedding=shared_embedding)


class FlaxBertModule(nn.Module):
  """Embeddings, encoder, optional pooler: (hidden states, pooled)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = True

  def setup(self):
    self.embeddings = FlaxBertEmbeddings(self.config, dtype=self.dtype)
    self.encoder = FlaxBertEncoder(self.config, dtype=self.dtype)
    self.pooler = FlaxBertPooler(self.config, dtype=self.dtype)

  def __call__(
    self,
    input_ids,
    attention_mask,
    token_type_ids=None,
    position_ids=None,
    head_mask=None,
    deterministic=True,
  ):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if position_ids is None:
      length = jnp.atleast_2d(input_ids).shape[-1]
      position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    hidden = self.embeddings(
      input_ids, token_type_ids, position_ids, attention_mask, deterministic=deterministic
    )
    hidden = self.encoder(hidden, attention_mask, head_mask, deterministic=deterministic)[0]
    pooled = self.pooler(hidden) if self.add_pooling_layer else None
    return (hidden,) if pooled is None else (hidden, pooled)


class FlaxBertForMaskedLMModule(nn.Module):
  """input ids [B, L] (and masks) -> (vocabulary logits [B, L, vocab_size],)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.bert = FlaxBertModule(config=self.config, add_pooling_layer=False, dtype=self.dtype)
    self.cls = FlaxBertOnlyMLMHead(config=self.config, dtype=self.dtype)

  def __call__(
    self, input_ids, attention_mask, token_type_ids, position_ids, head_mask, deterministic=True
  ):
    outputs = self.bert(
      input_ids, attention_mask, token_type_ids, position_ids, head_mask, deterministic
    )
    hidden = outputs[0]
    shared = None
    if self.config.tie_word_embeddings:
      shared = self.bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    return (self.cls(hidden, shared_embedding=shared),) + outputs[1:]


def forward(module: FlaxBertForMaskedLMModule, params, input_ids, train: bool = False):
  """``FlaxBertForMaskedLM.__call__(input_ids)``: the inputs it makes when left out (token
  types 0, positions 0..L-1, attention mask and head mask all ones), as int32."""
  cfg = module.config
  token_type_ids = jnp.zeros_like(input_ids)
  position_ids = jnp.broadcast_to(jnp.arange(jnp.atleast_2d(input_ids).shape[-1]), input_ids.shape)
  attention_mask = jnp.ones_like(input_ids)
  head_mask = jnp.ones((cfg.num_hidden_layers, cfg.num_attention_heads))
  return module.apply(
    {"params": params},
    jnp.array(input_ids, dtype="i4"),
    jnp.array(attention_mask, dtype="i4"),
    token_type_ids=jnp.array(token_type_ids, dtype="i4"),
    position_ids=jnp.array(position_ids, dtype="i4"),
    head_mask=jnp.array(head_mask, dtype="i4"),
    deterministic=not train,
  )
