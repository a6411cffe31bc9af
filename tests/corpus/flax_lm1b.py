"""The Flax lm1b example's decoder-only Transformer language model, tiny configs in the tests.

Source: https://github.com/google/flax, ``examples/lm1b/models.py`` (snapshot at commit
18f8f311c275d57f46d95e41b15aa97b454754c0; the file last changed in 97ca05d2). License:
Apache-2.0, Copyright 2024 The Flax Authors.

Re-implemented, not copied (public repositories' code stays out of this project's
commits): the same Flax layers with the same arguments, the same jnp/lax operations in the
same order and the same parameter names, so that the traced program has the original's
primitives (checked against the original source at JAX 0.10.2 when this file was written:
the same primitives with the same counts, and the same outputs on the same parameters).
Stubbed: nothing (the original imports only Flax, JAX and NumPy). Left out: the decode
(autoregressive cache) branches, which the corpus does not trace (``decode=False``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from jax import lax


@struct.dataclass
class TransformerConfig:
  """The example's hyperparameters (its field names and defaults)."""

  vocab_size: int
  output_vocab_size: int
  share_embeddings: bool = False
  logits_via_embedding: bool = False
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  qkv_dim: int = 512
  mlp_dim: int = 2048
  max_len: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = False
  decode: bool = False
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)
  posemb_init: Callable | None = None


def shift_right(x, axis=1):
  """``x`` shifted right by one along ``axis`` (zero padding in front, last entry dropped)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (1, 0)
  padded = jnp.pad(x, widths, mode="constant", constant_values=x.dtype.type(0))
  return lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def shift_inputs(x, segment_ids=None, axis=1):
  """Shifted inputs; for packed sequences, 0 where a new segment starts."""
  shifted = shift_right(x, axis=axis)
  if segment_ids is not None:
    shifted *= segment_ids == shift_right(segment_ids, axis=axis)
  return shifted


def sinusoidal_init(max_len=2048, min_scale=1.0, max_scale=10000.0):
  """An initializer of the fixed sinusoidal position table [1, max_len, d] (NumPy)."""

  def init(key, shape, dtype=np.float32):
    del key, dtype
    d = shape[-1]
    table = np.zeros((max_len, d), dtype=np.float32)
    pos = np.arange(0, max_len)[:, np.newaxis]
    scale = -np.log(max_scale / min_scale) / (d // 2 - 1)
    freq = min_scale * np.exp(np.arange(0, d // 2) * scale)
    table[:, : d // 2] = np.sin(pos * freq)
    table[:, d // 2 : 2 * (d // 2)] = np.cos(pos * freq)
    return jnp.array(table[np.newaxis, :, :])

  return init


class AddPositionEmbs(nn.Module):
  """inputs [B, L, d] + the position table's first L rows (or rows at inputs_positions)."""

  config: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, inputs, inputs_positions=None):
    cfg = self.config
    assert inputs.ndim == 3, f"Number of dimensions should be 3, but it is: {inputs.ndim}"
    length = inputs.shape[1]
    shape = (1, cfg.max_len, inputs.shape[-1])
    if cfg.posemb_init is None:
      table = sinusoidal_init(max_len=cfg.max_len)(None, shape, None)
    else:
      table = self.param("pos_embedding", cfg.posemb_init, shape)
    pe = table[:, :length, :]
    if inputs_positions is None:
      return inputs + pe
    return inputs + jnp.take(pe[0], inputs_positions, axis=0)


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> relu -> dropout -> Dense(out) -> dropout, logically partitioned."""

  config: TransformerConfig
  out_dim: int | None = None

  @nn.compact
  def __call__(self, inputs):
    cfg = self.config
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    part = nn.with_logical_partitioning
    x = nn.Dense(
      cfg.mlp_dim,
      dtype=cfg.dtype,
      kernel_init=part(cfg.kernel_init, ("embed", "mlp")),
      bias_init=part(cfg.bias_init, ("mlp",)),
    )(inputs)
    x = nn.relu(x)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    y = nn.Dense(
      out_dim,
      dtype=cfg.dtype,
      kernel_init=part(cfg.kernel_init, ("mlp", "embed")),
      bias_init=part(cfg.bias_init, ("embed",)),
    )(x)
    return nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)


def _layer_norm(cfg: TransformerConfig, name=None) -> nn.LayerNorm:
  part = nn.with_logical_partitioning
  return nn.LayerNorm(
    dtype=cfg.dtype,
    name=name,
    bias_init=part(nn.initializers.zeros, ("embed",)),
    scale_init=part(nn.initializers.ones, ("embed",)),
  )


class EncoderDecoder1DBlock(nn.Module):
  """Pre-norm block: x + Attention(LN(x)), then + Mlp(LN(.))."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, decoder_mask=None, encoder_decoder_mask=None):
    cfg = self.config
    assert inputs.ndim == 3
    x = _layer_norm(cfg)(inputs)
    x = nn.MultiHeadDotProductAttention(
      num_heads=cfg.num_heads,
      dtype=cfg.dtype,
      qkv_features=cfg.qkv_dim,
      kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("embed", "kv")),
      bias_init=nn.with_logical_partitioning(cfg.bias_init, ("embed",)),
      use_bias=False,
      broadcast_dropout=False,
      dropout_rate=cfg.attention_dropout_rate,
      deterministic=cfg.deterministic,
      decode=cfg.decode,
    )(x, mask=decoder_mask)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    x = x + inputs
    z = _layer_norm(cfg)(x)
    z = MlpBlock(config=cfg)(z)
    return x + z


class Decoder(nn.Module):
  """Token ids [B, L] -> logits [B, L, output_vocab_size]."""

  config: TransformerConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(
    self,
    inputs,
    inputs_positions=None,
    inputs_segmentation=None,
    decoder_mask=None,
    encoder_decoder_mask=None,
  ):
    cfg = self.config
    assert inputs.ndim == 2
    if self.shared_embedding is None:
      embed = nn.Embed(
        num_embeddings=cfg.output_vocab_size,
        features=cfg.emb_dim,
        embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1.0), ("vocab", "embed")
        ),
      )
    else:
      embed = self.shared_embedding
    y = inputs.astype("int32")
    if not cfg.decode:
      y = shift_inputs(y, segment_ids=inputs_segmentation)
    y = embed(y)
    y = AddPositionEmbs(config=cfg, decode=cfg.decode, name="posembed_output")(
      y, inputs_positions=inputs_positions
    )
    y = nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)
    y = y.astype(cfg.dtype)
    for i in range(cfg.num_layers):
      y = EncoderDecoder1DBlock(config=cfg, name=f"encoderdecoderblock_{i}")(
        y, decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask
      )
    y = _layer_norm(cfg, name="encoderdecoder_norm")(y)
    if cfg.logits_via_embedding:
      logits = embed.attend(y.astype(jnp.float32))
      return logits / jnp.sqrt(y.shape[-1])
    return nn.Dense(
      cfg.output_vocab_size,
      dtype=cfg.dtype,
      kernel_init=nn.with_logical_partitioning(cfg.kernel_init, ("embed", "vocab")),
      bias_init=nn.with_logical_partitioning(cfg.bias_init, ("vocab",)),
      name="logitdense",
    )(y)


class TransformerLM(nn.Module):
  """The decoder with a padding mask (ids > 0) and a causal mask: ids [B, L] -> logits."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, inputs_positions=None, inputs_segmentation=None):
    cfg = self.config
    if cfg.decode:
      decoder_mask = None
    else:
      decoder_mask = nn.combine_masks(
        nn.make_attention_mask(inputs > 0, inputs > 0, dtype=cfg.dtype),
        nn.make_causal_mask(inputs, dtype=cfg.dtype),
      )
    if inputs_segmentation is not None:
      decoder_mask = nn.combine_masks(
        decoder_mask,
        nn.make_attention_mask(
          inputs_segmentation, inputs_segmentation, jnp.equal, dtype=cfg.dtype
        ),
      )
    logits = Decoder(config=cfg, shared_embedding=None, name="decoder")(
      inputs,
      inputs_positions=inputs_positions,
      inputs_segmentation=inputs_segmentation,
      decoder_mask=decoder_mask,
      encoder_decoder_mask=None,
    )
    return logits.astype(cfg.dtype)
