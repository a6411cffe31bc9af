"""The Flax sst2 example's text classifier: embeddings, a bidirectional LSTM (``nn.scan`` of
an ``OptimizedLSTMCell`` over time), keys-only MLP attention, an MLP head.

Source: https://github.com/google/flax, ``examples/sst2/models.py`` (snapshot at commit
18f8f311c275d57f46d95e41b15aa97b454754c0, which last changed the file). License:
Apache-2.0, Copyright 2024 The Flax Authors.

Re-implemented, not copied (public repositories' code stays out of this project's
commits): the same Flax layers and transforms with the same arguments, the same jnp
operations in the same order and the same parameter names (checked against the original
source at JAX 0.10.2: the same primitives with the same counts, the same outputs on the
same parameters). Stubbed: nothing. Everything of the module is here, docstrings shortened.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn
from jax import numpy as jnp

Array = jnp.ndarray


def sequence_mask(lengths: Array, max_length: int) -> Array:
  """bool [B, max_length]: position < length of each sequence."""
  return jnp.arange(max_length)[None] < lengths[:, None]


@jax.vmap
def flip_sequences(inputs: Array, lengths: Array) -> Array:
  """Each sequence's first ``length`` entries reversed, its padding kept at the end
  (vmapped: written for one example)."""
  max_length = inputs.shape[0]
  return jnp.flip(jnp.roll(inputs, max_length - lengths, axis=0), axis=0)


class WordDropout(nn.Module):
  """Replaces input ids by ``unk_idx`` at rate ``dropout_rate`` (training only)."""

  dropout_rate: float
  unk_idx: int
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool | None = None):
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.dropout_rate == 0.0:
      return inputs
    rng = self.make_rng("dropout")
    mask = jax.random.bernoulli(rng, p=self.dropout_rate, shape=inputs.shape)
    return jnp.where(mask, jnp.array([self.unk_idx]), inputs)


class Embedder(nn.Module):
  """ids [B, L] -> embeddings [B, L, embedding_size] (a table indexed by the ids)."""

  vocab_size: int
  embedding_size: int
  embedding_init: Callable[..., Array] = nn.initializers.normal(stddev=0.1)
  frozen: bool = False
  dropout_rate: float = 0.0
  word_dropout_rate: float = 0.0
  unk_idx: int | None = None
  deterministic: bool | None = None
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding", self.embedding_init, (self.vocab_size, self.embedding_size), self.dtype
    )
    self.dropout_layer = nn.Dropout(rate=self.dropout_rate)
    self.word_dropout_layer = WordDropout(dropout_rate=self.word_dropout_rate, unk_idx=self.unk_idx)

  def __call__(self, inputs: Array, deterministic: bool | None = None) -> Array:
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    inputs = self.word_dropout_layer(inputs, deterministic=deterministic)
    embedded = self.embedding[inputs]
    if self.frozen:
      embedded = jax.lax.stop_gradient(embedded)
    return self.dropout_layer(embedded, deterministic=deterministic)


class SimpleLSTM(nn.Module):
  """An LSTM over axis 1: ``nn.scan`` of an OptimizedLSTMCell, parameters shared."""

  hidden_size: int

  @functools.partial(
    nn.transforms.scan,
    variable_broadcast="params",
    in_axes=1,
    out_axes=1,
    split_rngs={"params": False},
  )
  @nn.compact
  def __call__(self, carry, x):
    return nn.OptimizedLSTMCell(self.hidden_size)(carry, x)

  def initialize_carry(self, input_shape):
    # A fixed key: the default carry initializer gives zeros.
    return nn.OptimizedLSTMCell(self.hidden_size, parent=None).initialize_carry(
      jax.random.key(0), input_shape
    )


class SimpleBiLSTM(nn.Module):
  """Forward and backward LSTMs, outputs concatenated [B, L, 2 hidden]."""

  hidden_size: int

  def setup(self):
    self.forward_lstm = SimpleLSTM(self.hidden_size)
    self.backward_lstm = SimpleLSTM(self.hidden_size)

  def __call__(self, embedded_inputs, lengths):
    carry = self.forward_lstm.initialize_carry(embedded_inputs[:, 0].shape)
    _, forward_outputs = self.forward_lstm(carry, embedded_inputs)
    reversed_inputs = flip_sequences(embedded_inputs, lengths)
    carry = self.backward_lstm.initialize_carry(reversed_inputs[:, 0].shape)
    _, backward_outputs = self.backward_lstm(carry, reversed_inputs)
    backward_outputs = flip_sequences(backward_outputs, lengths)
    return jnp.concatenate([forward_outputs, backward_outputs], -1)


class MLP(nn.Module):
  """Dense(hidden) -> activation -> dropout -> Dense(output) on the last axis."""

  hidden_size: int
  output_size: int
  activation: Callable[..., Any] = nn.tanh
  dropout_rate: float = 0.0
  output_bias: bool = False
  deterministic: bool | None = None

  def setup(self):
    self.intermediate_layer = nn.Dense(self.hidden_size)
    self.output_layer = nn.Dense(self.output_size, use_bias=self.output_bias)
    self.dropout_layer = nn.Dropout(rate=self.dropout_rate)

  def __call__(self, inputs: Array, deterministic: bool | None = None):
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    hidden = self.intermediate_layer(inputs)
    hidden = self.activation(hidden)
    hidden = self.dropout_layer(hidden, deterministic=deterministic)
    return self.output_layer(hidden)


class KeysOnlyMlpAttention(nn.Module):
  """Attention weights [B, L] from the keys alone: softmax of an MLP's score per position,
  positions outside ``mask`` excluded (Bahdanau et al., 2015)."""

  hidden_size: int

  @nn.compact
  def __call__(self, keys: Array, mask: Array) -> Array:
    hidden = nn.Dense(self.hidden_size, name="keys", use_bias=False)(keys)
    energy = nn.tanh(hidden)
    scores = nn.Dense(1, name="energy", use_bias=False)(energy)
    scores = scores.squeeze(-1)
    scores = jnp.where(mask, scores, -jnp.inf)
    scores = nn.softmax(scores, axis=-1)
    self.sow("intermediates", "attention", scores)
    return scores


class AttentionClassifier(nn.Module):
  """Encoded inputs [B, L, d] -> logits [B, output_size]: attention-weighted sum, MLP."""

  hidden_size: int
  output_size: int
  dropout_rate: float = 0.0
  deterministic: bool | None = None

  def setup(self):
    self.dropout_layer = nn.Dropout(rate=self.dropout_rate)
    self.keys_only_mlp_attention = KeysOnlyMlpAttention(hidden_size=self.hidden_size)
    self.mlp = MLP(
      hidden_size=self.hidden_size,
      output_size=self.output_size,
      output_bias=False,
      dropout_rate=self.dropout_rate,
    )

  def __call__(self, encoded_inputs: Array, lengths: Array, deterministic: bool | None = None):
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    encoded_inputs = self.dropout_layer(encoded_inputs, deterministic=deterministic)
    mask = sequence_mask(lengths, encoded_inputs.shape[1])
    attention = self.keys_only_mlp_attention(encoded_inputs, mask)
    context = jnp.expand_dims(attention, 1) @ encoded_inputs
    context = context.squeeze(1)
    context = self.dropout_layer(context, deterministic=deterministic)
    return self.mlp(context, deterministic=deterministic)


class TextClassifier(nn.Module):
  """(token ids [B, L], lengths [B]) -> logits [B, output_size]."""

  embedding_size: int
  hidden_size: int
  vocab_size: int
  output_size: int
  dropout_rate: float
  word_dropout_rate: float
  unk_idx: int = 1
  deterministic: bool | None = None

  def setup(self):
    self.embedder = Embedder(
      vocab_size=self.vocab_size,
      embedding_size=self.embedding_size,
      dropout_rate=self.dropout_rate,
      word_dropout_rate=self.word_dropout_rate,
      unk_idx=self.unk_idx,
    )
    self.encoder = SimpleBiLSTM(hidden_size=self.hidden_size)
    self.classifier = AttentionClassifier(
      hidden_size=self.hidden_size, output_size=self.output_size, dropout_rate=self.dropout_rate
    )

  def embed_token_ids(self, token_ids: Array, deterministic: bool | None = None) -> Array:
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    return self.embedder(token_ids, deterministic=deterministic)

  def logits_from_embedded_inputs(
    self, embedded_inputs: Array, lengths: Array, deterministic: bool | None = None
  ) -> Array:
    deterministic = nn.module.merge_param("deterministic", self.deterministic, deterministic)
    encoded_inputs = self.encoder(embedded_inputs, lengths)
    return self.classifier(encoded_inputs, lengths, deterministic=deterministic)

  def __call__(self, token_ids: Array, lengths: Array, deterministic: bool | None = None):
    embedded = self.embed_token_ids(token_ids, deterministic=deterministic)
    return self.logits_from_embedded_inputs(embedded, lengths, deterministic=deterministic)
