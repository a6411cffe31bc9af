"""ViT for image classification as the Flax model hub defines it, tiny configs in the tests.

Source: https://github.com/huggingface/transformers,
``src/transformers/models/vit/modeling_flax_vit.py`` as released in transformers 4.46.3
(its PyPI wheel, tag v4.46.3; the last releases ship Flax models).
License: Apache-2.0, Copyright 2021 The Google Flax Team Authors and The HuggingFace Inc. team.

A port of the nn.Module classes (the file depends on the transformers package, which is no
dependency here), re-implemented rather than copied: the same Flax layers with the same
arguments, the same jnp operations in the same order and the same parameter names (checked
against transformers 4.46.3 at JAX 0.10.2: the same primitives with the same counts, the
same logits on the same parameters). Stubbed: ``ViTConfig`` (a frozen dataclass with the
fields the modules read, the library's defaults), ``ACT2FN`` (the activations the configs
name), the output dataclasses (tuples), and ``FlaxViTPreTrainedModel.__call__``'s input
handling (:func:`forward`: NCHW pixels transposed to NHWC). Left out: the other heads.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.attention import dot_product_attention_weights

#: transformers.modeling_flax_utils.ACT2FN, the entries the corpus configs use.
ACT2FN = {
  "gelu": functools.partial(nn.gelu, approximate=False),
  "relu": nn.relu,
  "gelu_new": functools.partial(nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The fields of transformers.ViTConfig the modules read, with its defaults."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  num_labels: int = 2


def _init(config: ViTConfig):
  return jax.nn.initializers.variance_scaling(
    config.initializer_range**2, "fan_in", "truncated_normal"
  )


class FlaxViTPatchEmbeddings(nn.Module):
  """Non-overlapping patches by a strided Conv: [B, H, W, C] -> [B, patches, hidden]."""

  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    side = cfg.image_size // cfg.patch_size
    self.num_patches = side * side
    self.num_channels = cfg.num_channels
    self.projection = nn.Conv(
      cfg.hidden_size,
      kernel_size=(cfg.patch_size, cfg.patch_size),
      strides=(cfg.patch_size, cfg.patch_size),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=_init(cfg),
    )

  def __call__(self, pixel_values):
    if pixel_values.shape[-1] != self.num_channels:
      raise ValueError(
        f"pixel_values has {pixel_values.shape[-1]} channels; the config says {self.num_channels}."
      )
    emb = self.projection(pixel_values)
    batch_size, _, _, channels = emb.shape
    return jnp.reshape(emb, (batch_size, -1, channels))


class FlaxViTEmbeddings(nn.Module):
  """[CLS] token (broadcast) prepended to the patch embeddings, plus learned positions."""

  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.cls_token = self.param("cls_token", _init(cfg), (1, 1, cfg.hidden_size))
    self.patch_embeddings = FlaxViTPatchEmbeddings(cfg, dtype=self.dtype)
    n = self.patch_embeddings.num_patches
    self.position_embeddings = self.param(
      "position_embeddings", _init(cfg), (1, n + 1, cfg.hidden_size)
    )
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

  def __call__(self, pixel_values, deterministic=True):
    batch_size = pixel_values.shape[0]
    emb = self.patch_embeddings(pixel_values)
    cls = jnp.broadcast_to(self.cls_token, (batch_size, 1, self.config.hidden_size))
    emb = jnp.concatenate((cls, emb), axis=1)
    emb = emb + self.position_embeddings
    return self.dropout(emb, deterministic=deterministic)


class FlaxViTSelfAttention(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    if cfg.hidden_size % cfg.num_attention_heads != 0:
      raise ValueError(
        f"config.hidden_size={cfg.hidden_size} must be a multiple of "
        f"config.num_attention_heads={cfg.num_attention_heads}"
      )
    dense = functools.partial(
      nn.Dense,
      cfg.hidden_size,
      dtype=self.dtype,
      kernel_init=jax.nn.initializers.variance_scaling(
        cfg.initializer_range**2, mode="fan_in", distribution="truncated_normal"
      ),
      use_bias=cfg.qkv_bias,
    )
    self.query, self.key, self.value = dense(), dense(), dense()

  def __call__(self, hidden_states, deterministic=True):
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    heads = hidden_states.shape[:2] + (cfg.num_attention_heads, head_dim)
    query = self.query(hidden_states).reshape(heads)
    value = self.value(hidden_states).reshape(heads)
    key = self.key(hidden_states).reshape(heads)
    dropout_rng = None
    if not deterministic and cfg.attention_probs_dropout_prob > 0.0:
      dropout_rng = self.make_rng("dropout")
    weights = dot_product_attention_weights(
      query,
      key,
      dropout_rng=dropout_rng,
      dropout_rate=cfg.attention_probs_dropout_prob,
      broadcast_dropout=True,
      deterministic=deterministic,
      dtype=self.dtype,
      precision=None,
    )
    out = jnp.einsum("...hqk,...khd->...qhd", weights, value)
    return (out.reshape(out.shape[:2] + (-1,)),)


class FlaxViTSelfOutput(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_init(cfg), dtype=self.dtype)
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

  def __call__(self, hidden_states, input_tensor, deterministic=True):
    return self.dropout(self.dense(hidden_states), deterministic=deterministic)


class FlaxViTAttention(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.attention = FlaxViTSelfAttention(self.config, dtype=self.dtype)
    self.output = FlaxViTSelfOutput(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, deterministic=True):
    attn = self.attention(hidden_states, deterministic=deterministic)[0]
    return (self.output(attn, hidden_states, deterministic=deterministic),)


class FlaxViTIntermediate(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.intermediate_size, kernel_init=_init(cfg), dtype=self.dtype)
    self.activation = ACT2FN[cfg.hidden_act]

  def __call__(self, hidden_states):
    return self.activation(self.dense(hidden_states))


class FlaxViTOutput(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_init(cfg), dtype=self.dtype)
    self.dropout = nn.Dropout(rate=cfg.hidden_dropout_prob)

  def __call__(self, hidden_states, attention_output, deterministic=True):
    hidden = self.dropout(self.dense(hidden_states), deterministic=deterministic)
    return hidden + attention_output


class FlaxViTLayer(nn.Module):
  """Pre-norm layer: x + attention(LN(x)), then + MLP(LN(.))."""

  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.attention = FlaxViTAttention(cfg, dtype=self.dtype)
    self.intermediate = FlaxViTIntermediate(cfg, dtype=self.dtype)
    self.output = FlaxViTOutput(cfg, dtype=self.dtype)
    self.layernorm_before = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    self.layernorm_after = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)

  def __call__(self, hidden_states, deterministic=True):
    attn = self.attention(self.layernorm_before(hidden_states), deterministic=deterministic)[0]
    attn = attn + hidden_states
    hidden = self.intermediate(self.layernorm_after(attn))
    return (self.output(hidden, attn, deterministic=deterministic),)


class FlaxViTLayerCollection(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    n = self.config.num_hidden_layers
    self.layers = [FlaxViTLayer(self.config, name=str(i), dtype=self.dtype) for i in range(n)]

  def __call__(self, hidden_states, deterministic=True):
    for layer in self.layers:
      hidden_states = layer(hidden_states, deterministic=deterministic)[0]
    return (hidden_states,)


class FlaxViTEncoder(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.layer = FlaxViTLayerCollection(self.config, dtype=self.dtype)

  def __call__(self, hidden_states, deterministic=True):
    return self.layer(hidden_states, deterministic=deterministic)


class FlaxViTModule(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  add_pooling_layer: bool = True

  def setup(self):
    cfg = self.config
    self.embeddings = FlaxViTEmbeddings(cfg, dtype=self.dtype)
    self.encoder = FlaxViTEncoder(cfg, dtype=self.dtype)
    self.layernorm = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    self.pooler = FlaxViTPooler(cfg, dtype=self.dtype) if self.add_pooling_layer else None

  def __call__(self, pixel_values, deterministic=True):
    hidden = self.embeddings(pixel_values, deterministic=deterministic)
    hidden = self.encoder(hidden, deterministic=deterministic)[0]
    hidden = self.layernorm(hidden)
    pooled = self.pooler(hidden) if self.add_pooling_layer else None
    return (hidden,) if pooled is None else (hidden, pooled)


class FlaxViTPooler(nn.Module):
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.dense = nn.Dense(cfg.hidden_size, kernel_init=_init(cfg), dtype=self.dtype)

  def __call__(self, hidden_states):
    return nn.tanh(self.dense(hidden_states[:, 0]))


class FlaxViTForImageClassificationModule(nn.Module):
  """pixels [B, H, W, C] -> (logits [B, num_labels],) from the [CLS] token."""

  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.vit = FlaxViTModule(config=cfg, dtype=self.dtype, add_pooling_layer=False)
    self.classifier = nn.Dense(cfg.num_labels, dtype=self.dtype, kernel_init=_init(cfg))

  def __call__(self, pixel_values=None, deterministic=True):
    hidden = self.vit(pixel_values, deterministic=deterministic)[0]
    return (self.classifier(hidden[:, 0, :]),)


def forward(module: FlaxViTForImageClassificationModule, params, pixel_values, train=False):
  """``FlaxViTForImageClassification.__call__(pixel_values)``: NCHW pixels [B, C, H, W]
  transposed to the modules' NHWC."""
  pixel_values = jnp.transpose(pixel_values, (0, 2, 3, 1))
  return module.apply({"params": params}, jnp.array(pixel_values, dtype=jnp.float32), not train)
