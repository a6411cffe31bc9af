"""big_vision's MLP-Mixer, tiny configs in the tests.

Source: https://github.com/google-research/big_vision, ``big_vision/models/mlp_mixer.py``
(snapshot at commit 0127fb6b337ee2a27bf4e54dea79cff176527356; the file last changed in
642c086e). License: Apache-2.0, Copyright 2024 Big Vision Authors.

Re-implemented, not copied (public repositories' code stays out of this project's
commits): the same Flax layers, the same jnp operations in the same order and the
same parameter names (checked against the original source at JAX 0.10.2: the same
primitives with the same counts, the same outputs on the same parameters). Stubbed:
``big_vision.utils`` and ``big_vision.models.common`` (used by the original's checkpoint
``load`` only, which is left out); absl logging of the config is dropped; einops (no
dependency here): ``einops.rearrange(x, "n h w c -> n (h w) c")`` is :func:`_rearrange`,
the one reshape einops emits for it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> gelu -> Dense(d) on the last axis."""

  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim)(x)
    y = nn.gelu(y)
    return nn.Dense(x.shape[-1])(y)


class MixerBlock(nn.Module):
  """Token mixing (an MLP across tokens) then channel mixing, each pre-norm and residual,
  with stochastic depth in training."""

  tokens_mlp_dim: int
  channels_mlp_dim: int
  drop_p: float

  @nn.compact
  def __call__(self, x, *, train=False):
    y = nn.LayerNorm()(x)
    y = jnp.swapaxes(y, 1, 2)
    y = MlpBlock(self.tokens_mlp_dim, name="token_mixing")(y)
    y = jnp.swapaxes(y, 1, 2)
    x = x + y * _stoch_depth_mask(x, self.drop_p, not train, self.make_rng)
    y = nn.LayerNorm()(x)
    y = MlpBlock(self.channels_mlp_dim, name="channel_mixing")(y)
    return x + y * _stoch_depth_mask(x, self.drop_p, not train, self.make_rng)


class MlpMixer(nn.Module):
  """image [N, H, W, C] -> (logits [N, num_classes], intermediates)."""

  patch_size: tuple[int, int]
  num_classes: int | None
  num_blocks: int
  hidden_dim: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  model_name: str | None = None
  stoch_depth: float = 0.0

  @nn.compact
  def __call__(self, image, *, train=False):
    out = {}
    x = out["stem"] = nn.Conv(
      self.hidden_dim, self.patch_size, strides=self.patch_size, name="stem"
    )(image)
    x = out["input_tokens"] = _rearrange(x)
    for i in range(self.num_blocks):
      drop_p = (i / max(self.num_blocks - 1, 1)) * self.stoch_depth
      x = out[f"block_{i}"] = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, drop_p)(
        x, train=train
      )
    x = nn.LayerNorm(name="pre_head_layer_norm")(x)
    x = out["pre_logits"] = jnp.mean(x, axis=1)
    if self.num_classes:
      x = out["logits"] = nn.Dense(
        self.num_classes, kernel_init=nn.initializers.zeros, name="head"
      )(x)
    return x, out


def Model(num_classes=None, *, variant=None, **kw):  # noqa: N802 (the original's name)
  """The Mixer of ``variant`` ('S/16', 'B/32', 'L/16', 'H/14') with ``kw`` overriding."""
  if variant is not None:
    size, patch = variant.split("/")
    kw.setdefault("patch_size", (int(patch), int(patch)))
    sizes = {  # name: (hidden_dim, num_blocks, channels_mlp_dim, tokens_mlp_dim)
      "S": (512, 8, 2048, 256),
      "B": (768, 12, 3072, 384),
      "L": (1024, 24, 4096, 512),
      "H": (1280, 32, 5120, 640),
    }
    fields = ("hidden_dim", "num_blocks", "channels_mlp_dim", "tokens_mlp_dim")
    for k, v in zip(fields, sizes[size]):
      kw.setdefault(k, v)
  return MlpMixer(num_classes=num_classes, **kw)


def _rearrange(x):
  """``einops.rearrange(x, "n h w c -> n (h w) c")``: [N, H, W, C] -> [N, H*W, C]."""
  n, h, w, c = x.shape
  return jnp.reshape(x, (n, h * w, c))


def _stoch_depth_mask(x, drop_p, deterministic, make_rng):
  """1 - Bernoulli(drop_p) per example in training, else 1."""
  if not deterministic and drop_p:
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return 1.0 - jax.random.bernoulli(make_rng("dropout"), drop_p, shape)
  return 1.0
