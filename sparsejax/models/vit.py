"""A Vision Transformer for MNIST-sized images (Dosovitskiy et al., 2021, "An image is
worth 16x16 words"), small enough to train on a CPU in minutes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sparsejax.models import transformer
from sparsejax.models.registry import ModelSpec, register_model


class ViT(nn.Module):
  """Patches -> class token + learned positions -> pre-norm blocks -> LayerNorm -> head.

  Input [B, H, W, C] (H and W multiples of ``patch``), output logits [B, classes]. The
  image is cut into N = (H / p)(W / p) patches of p x p pixels, each embedded to
  ``width`` features (``patch_embedding``: 'conv', a p x p convolution with stride p,
  kernel [p, p, C, width]; or 'dense', the flattened patch times a Dense kernel
  [p p C, width]: the same function); a learned class token (zeros at
  initialization) is prepended (``jnp.tile`` over the batch), learned position
  embeddings [N + 1, width] added, ``depth`` :class:`~sparsejax.models.transformer.Block`
  s applied (no mask), and the class token's final LayerNorm feeds the Dense 'head'.
  ``pool='gap'`` has no class token: the head reads the mean of the final LayerNorm's
  N tokens (big_vision's 'gap'; position embeddings [N, width]).

  The default (patch 7: 16 tokens, width 64, depth 4, 4 heads, MLP 256) has 205k
  parameters.
  """

  num_classes: int = 10
  patch: int = 7
  width: int = 64
  depth: int = 4
  heads: int = 4
  mlp_ratio: int = 4
  patch_embedding: str = "conv"
  pool: str = "token"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics: the same function in both modes
    b, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"patch={p} must divide the image's height {h} and width {w}.")
    transformer.check_heads(self.width, self.heads)
    n = (h // p) * (w // p)
    if self.patch_embedding == "conv":
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embed")(x)
      x = x.reshape(b, n, self.width)
    elif self.patch_embedding == "dense":
      x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
      x = nn.Dense(self.width, name="embed")(x.reshape(b, n, p * p * c))
    else:
      raise ValueError(
        f"patch_embedding={self.patch_embedding!r} is not allowed; use 'conv' or 'dense'."
      )
    if self.pool not in ("token", "gap"):
      raise ValueError(f"pool={self.pool!r} is not allowed; use 'token' or 'gap'.")
    if self.pool == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    x = x + self.param("pos_embed", nn.initializers.normal(0.02), (x.shape[1], self.width))
    for i in range(self.depth):
      x = transformer.Block(self.heads, self.mlp_ratio, name=f"block_{i}")(x)
    if self.pool == "token":
      x = nn.LayerNorm(name="norm")(x[:, 0])
    else:  # normalized before the mean: SynFlow's linearization reads it (see tests)
      x = nn.LayerNorm(name="norm")(x).mean(axis=1)
    return nn.Dense(self.num_classes, name="head")(x)


register_model("vit", ModelSpec(ViT, {}, "mnist", (28, 28, 1), 10))
