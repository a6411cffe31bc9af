"""The Flax wmt example's encoder-decoder Transformer (translation), tiny configs in the tests.

Source: https://github.com/google/flax, ``examples/wmt/models.py`` (snapshot at commit
18f8f311c275d57f46d95e41b15aa97b454754c0; the file last changed in c29b6d6b). License:
Apache-2.0, Copyright 2024 The Flax Authors.

Re-implemented, not copied (public repositories' code stays out of this project's
commits): the same Flax layers with the same arguments, the same jnp/lax operations in the
same order and the same parameter names (checked against the original source at JAX 0.10.2:
the same primitives with the same counts, the same outputs on the same parameters).
Stubbed: nothing. Left out: the decode (autoregressive cache) branches (``decode=False``).
The example's default config shares the embedding between encoder, decoder and the logits
(``share_embeddings=True``, ``logits_via_embedding=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct


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
  """``x`` shifted right by one along ``axis`` (a zero in front; the slice drops axis 1's
  last entry, as the example does)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (1, 0)
  padded = jnp.pad(x, widths, mode="constant", constant_values=x.dtype.type(0))
  return padded[:, :-1]


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
  """Dense(mlp_dim) -> relu -> dropout -> Dense(out) -> dropout."""

  config: TransformerConfig
  out_dim: int | None = None

  @nn.compact
  def __call__(self, inputs):
    cfg = self.config
    out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
    x = nn.Dense(
      cfg.mlp_dim, dtype=cfg.dtype, kernel_init=cfg.kernel_init, bias_init=cfg.bias_init
    )(inputs)
    x = nn.relu(x)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    y = nn.Dense(out_dim, dtype=cfg.dtype, kernel_init=cfg.kernel_init, bias_init=cfg.bias_init)(x)
    return nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)


def _attention(cfg: TransformerConfig, decode: bool = False) -> nn.MultiHeadDotProductAttention:
  return nn.MultiHeadDotProductAttention(
    num_heads=cfg.num_heads,
    dtype=cfg.dtype,
    qkv_features=cfg.qkv_dim,
    kernel_init=cfg.kernel_init,
    bias_init=cfg.bias_init,
    use_bias=False,
    broadcast_dropout=False,
    dropout_rate=cfg.attention_dropout_rate,
    deterministic=cfg.deterministic,
    decode=decode,
  )


class Encoder1DBlock(nn.Module):
  """Pre-norm encoder block: x + SelfAttention(LN(x)), then + Mlp(LN(.))."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, encoder_mask=None):
    cfg = self.config
    assert inputs.ndim == 3
    x = nn.LayerNorm(dtype=cfg.dtype)(inputs)
    x = _attention(cfg)(x, mask=encoder_mask)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    x = x + inputs
    y = nn.LayerNorm(dtype=cfg.dtype)(x)
    y = MlpBlock(config=cfg)(y)
    return x + y


class EncoderDecoder1DBlock(nn.Module):
  """Pre-norm decoder block: self-attention, cross-attention on ``encoded``, Mlp."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, targets, encoded, decoder_mask=None, encoder_decoder_mask=None):
    cfg = self.config
    assert targets.ndim == 3
    x = nn.LayerNorm(dtype=cfg.dtype)(targets)
    x = _attention(cfg, decode=cfg.decode)(x, mask=decoder_mask)
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    x = x + targets
    y = nn.LayerNorm(dtype=cfg.dtype)(x)
    y = _attention(cfg)(y, encoded, mask=encoder_decoder_mask)
    y = nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)
    y = y + x
    z = nn.LayerNorm(dtype=cfg.dtype)(y)
    z = MlpBlock(config=cfg)(z)
    return y + z


def _embed(num: int, cfg: TransformerConfig) -> nn.Embed:
  return nn.Embed(
    num_embeddings=num, features=cfg.emb_dim, embedding_init=nn.initializers.normal(stddev=1.0)
  )


class Encoder(nn.Module):
  """Source ids [B, L] -> encoded [B, L, emb_dim]."""

  config: TransformerConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(self, inputs, inputs_positions=None, encoder_mask=None):
    cfg = self.config
    assert inputs.ndim == 2
    embed = _embed(cfg.vocab_size, cfg) if self.shared_embedding is None else self.shared_embedding
    x = inputs.astype("int32")
    x = embed(x)
    x = AddPositionEmbs(config=cfg, decode=False, name="posembed_input")(
      x, inputs_positions=inputs_positions
    )
    x = nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=cfg.deterministic)
    x = x.astype(cfg.dtype)
    for i in range(cfg.num_layers):
      x = Encoder1DBlock(config=cfg, name=f"encoderblock_{i}")(x, encoder_mask)
    return nn.LayerNorm(dtype=cfg.dtype, name="encoder_norm")(x)


class Decoder(nn.Module):
  """(encoded, target ids [B, L]) -> logits [B, L, output_vocab_size]."""

  config: TransformerConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(
    self, encoded, targets, targets_positions=None, decoder_mask=None, encoder_decoder_mask=None
  ):
    cfg = self.config
    assert encoded.ndim == 3
    assert targets.ndim == 2
    if self.shared_embedding is None:
      embed = _embed(cfg.output_vocab_size, cfg)
    else:
      embed = self.shared_embedding
    y = targets.astype("int32")
    if not cfg.decode:
      y = shift_right(y)
    y = embed(y)
    y = AddPositionEmbs(config=cfg, decode=cfg.decode, name="posembed_output")(
      y, inputs_positions=targets_positions
    )
    y = nn.Dropout(rate=cfg.dropout_rate)(y, deterministic=cfg.deterministic)
    y = y.astype(cfg.dtype)
    for i in range(cfg.num_layers):
      y = EncoderDecoder1DBlock(config=cfg, name=f"encoderdecoderblock_{i}")(
        y, encoded, decoder_mask=decoder_mask, encoder_decoder_mask=encoder_decoder_mask
      )
    y = nn.LayerNorm(dtype=cfg.dtype, name="encoderdecoder_norm")(y)
    if cfg.logits_via_embedding:
      logits = embed.attend(y.astype(jnp.float32))
      return logits / jnp.sqrt(y.shape[-1])
    return nn.Dense(
      cfg.output_vocab_size,
      dtype=cfg.dtype,
      kernel_init=cfg.kernel_init,
      bias_init=cfg.bias_init,
      name="logitdense",
    )(y)


class Transformer(nn.Module):
  """(source ids [B, Ls], target ids [B, Lt]) -> logits [B, Lt, output_vocab_size]; padding
  (id 0) masked in both, causal in the decoder."""

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      if cfg.output_vocab_size is not None:
        assert cfg.output_vocab_size == cfg.vocab_size, (
          "can't share embedding with different vocab sizes."
        )
      self.shared_embedding = _embed(cfg.vocab_size, cfg)
    else:
      self.shared_embedding = None
    self.encoder = Encoder(config=cfg, shared_embedding=self.shared_embedding)
    self.decoder = Decoder(config=cfg, shared_embedding=self.shared_embedding)

  def encode(self, inputs, inputs_positions=None, inputs_segmentation=None):
    cfg = self.config
    encoder_mask = nn.make_attention_mask(inputs > 0, inputs > 0, dtype=cfg.dtype)
    if inputs_segmentation is not None:
      encoder_mask = nn.combine_masks(
        encoder_mask,
        nn.make_attention_mask(
          inputs_segmentation, inputs_segmentation, jnp.equal, dtype=cfg.dtype
        ),
      )
    return self.encoder(inputs, inputs_positions=inputs_positions, encoder_mask=encoder_mask)

  def decode(
    self,
    encoded,
    inputs,
    targets,
    targets_positions=None,
    inputs_segmentation=None,
    targets_segmentation=None,
  ):
    cfg = self.config
    if cfg.decode:
      decoder_mask = None
      encoder_decoder_mask = nn.make_attention_mask(
        jnp.ones_like(targets) > 0, inputs > 0, dtype=cfg.dtype
      )
    else:
      decoder_mask = nn.combine_masks(
        nn.make_attention_mask(targets > 0, targets > 0, dtype=cfg.dtype),
        nn.make_causal_mask(targets, dtype=cfg.dtype),
      )
      encoder_decoder_mask = nn.make_attention_mask(targets > 0, inputs > 0, dtype=cfg.dtype)
    if inputs_segmentation is not None:
      decoder_mask = nn.combine_masks(
        decoder_mask,
        nn.make_attention_mask(
          targets_segmentation, targets_segmentation, jnp.equal, dtype=cfg.dtype
        ),
      )
      encoder_decoder_mask = nn.combine_masks(
        encoder_decoder_mask,
        nn.make_attention_mask(
          targets_segmentation, inputs_segmentation, jnp.equal, dtype=cfg.dtype
        ),
      )
    logits = self.decoder(
      encoded,
      targets,
      targets_positions=targets_positions,
      decoder_mask=decoder_mask,
      encoder_decoder_mask=encoder_decoder_mask,
    )
    return logits.astype(cfg.dtype)

  def __call__(
    self,
    inputs,
    targets,
    inputs_positions=None,
    targets_positions=None,
    inputs_segmentation=None,
    targets_segmentation=None,
  ):
    encoded = self.encode(
      inputs, inputs_positions=inputs_positions, inputs_segmentation=inputs_segmentation
    )
    return self.decode(
      encoded,
      inputs,
      targets,
      targets_positions=targets_positions,
      inputs_segmentation=inputs_segmentation,
      targets_segmentation=targets_segmentation,
    )
