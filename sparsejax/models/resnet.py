"""ResNet-18 for 64x64 Tiny ImageNet (method.md section 5)."""

from __future__ import annotations

import flax.linen as nn
import jax

from sparsejax.models import layers as L
from sparsejax.models.registry import ModelSpec, register_model


class BasicBlock(nn.Module):
  """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); no biases.

  The shortcut is a 1x1 conv + BN where the shape changes, the identity otherwise.
  ``inner``: conv_1's width (default ``features``; fewer in a compacted network).
  """

  features: int
  stride: int = 1
  inner: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: L.Conv(
      f, (k, k), strides=(s, s), padding="SAME", use_bias=False, name=name
    )
    inner = self.features if self.inner is None else self.inner
    y = conv(inner, 3, self.stride, "conv_1")(x)
    y = L.Norm(name="norm_1")(y, train)
    y = nn.relu(y)
    y = conv(self.features, 3, 1, "conv_2")(y)
    y = L.Norm(name="norm_2")(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, "shortcut_conv")(x)
      x = L.Norm(name="shortcut_norm")(x, train)
    return nn.relu(y + x)


class ResNet18(nn.Module):
  """Stem conv3x3(64) stride 1 (no max pool), four stages of two basic blocks
  (64, 128, 256, 512; stride 2 at the first block of stages 2-4), global average
  pool, Dense without bias. Input [B, 64, 64, 3] -> logits [B, classes].

  ``widths``: the residual stream width per stage (the stem writes stage 1's);
  ``inner``: conv_1's width per block (8, stage-major; default the stage widths). A
  compacted network (:mod:`sparsejax.compact`) has fewer.
  """

  num_classes: int = 200
  widths: tuple = (64, 128, 256, 512)
  inner: tuple | None = None

  def resized(self, params) -> ResNet18:
    """This network with the widths of ``params`` (a compacted network's)."""
    n = len(self.widths)
    block = lambda s, b, conv: params[f"stage{s}_block{b}"][conv]["kernel"].shape[-1]
    return self.clone(
      widths=tuple(block(s, 0, "conv_2") for s in range(1, n + 1)),
      inner=tuple(block(s, b, "conv_1") for s in range(1, n + 1) for b in range(2)),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Names sort in input-to-output order: stage0 (stem) ... stage5 (head).
    x = L.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stage0_conv")(x)
    x = L.Norm(name="stage0_norm")(x, train)
    x = nn.relu(x)
    for stage, features in enumerate(self.widths, start=1):
      for block in range(2):
        stride = 2 if stage > 1 and block == 0 else 1
        inner = None if self.inner is None else self.inner[2 * (stage - 1) + block]
        x = BasicBlock(features, stride, inner, name=f"stage{stage}_block{block}")(x, train)
    x = L.global_avg_pool(x)
    return L.Dense(self.num_classes, use_bias=False, name="stage5_dense")(x)


register_model("resnet18", ModelSpec(ResNet18, {}, "tiny_imagenet", (64, 64, 3), 200))
