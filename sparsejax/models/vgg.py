"""VGG-16 and VGG-19 for 32x32 inputs (method.md section 5)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from sparsejax.models import layers as L
from sparsejax.models.registry import ModelSpec, register_model

#: Conv widths; "M" is a 2x2 max pool.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19 = (
  64,
  64,
  "M",
  128,
  128,
  "M",
  256,
  256,
  256,
  256,
  "M",
  512,
  512,
  512,
  512,
  "M",
  512,
  512,
  512,
  512,
  "M",
)


class VGG(nn.Module):
  """Conv3x3 'SAME' + BN + ReLU blocks with 2x2 max pools, then one Dense to the classes.

  Input [B, 32, 32, 3] -> [B, 1, 1, 512] -> flatten -> logits [B, classes].
  """

  config: Sequence = VGG16
  num_classes: int = 10

  def resized(self, params) -> VGG:
    """This network with the widths of ``params`` (a compacted network's)."""
    widths = iter(
      params[f"conv_{i:02d}"]["kernel"].shape[-1] for i in range(sum(w != "M" for w in self.config))
    )
    return self.clone(config=tuple("M" if w == "M" else next(widths) for w in self.config))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    i = 0
    for item in self.config:
      if item == "M":
        x = L.pool(x, "max", 2)
        continue
      # Two-digit names keep the params tree (sorted keys) in input-to-output order.
      x = L.Conv(item, (3, 3), padding="SAME", name=f"conv_{i:02d}")(x)
      x = L.Norm(name=f"norm_{i:02d}")(x, train)
      x = nn.relu(x)
      i += 1
    x = L.flatten(x)
    return L.Dense(self.num_classes, name="dense")(x)


register_model("vgg16", ModelSpec(VGG, {"config": VGG16}, "cifar10", (32, 32, 3), 10))
register_model("vgg19", ModelSpec(VGG, {"config": VGG19}, "cifar100", (32, 32, 3), 100))
