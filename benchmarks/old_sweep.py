"""A copy of the mode-based connectivity sweep that the connectivity transform replaced
(sparsejax before issue 10: layers with a `mode` field, gate/perturb/sow plumbing), kept
only so that benchmarks/effective.py can time the transform against it in one run."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import connectivity
from sparsejax import masks as masks_lib

Masks = Any

STANDARD = "standard"
LINEAR = "linear"
CONNECTIVITY = "connectivity"
MODES = (STANDARD, LINEAR, CONNECTIVITY)

#: Initializer for every kernel (method.md section 5): variance scaling, scale 2, fan_avg, normal.
kernel_init = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is not a model mode; allowed: {', '.join(MODES)}.")
  return mode


# The binary gate is the transform's own (float32 inputs here, so the same values).
gate = connectivity.gate


def rescale(y: jax.Array, mode: str) -> jax.Array:
  """In linear mode, y / stop_gradient(max |y|) (y if all zero); else y.

  Apply only to tensors that every input-output path passes through (a cut of the
  network), so that the factor is common to all of R's terms.
  """
  if mode != LINEAR:
    return y
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(y)))
  return y / jnp.where(scale > 0, scale, 1.0)


class _ModeOutput:
  """Mixin: what a prunable layer does with its output in each mode."""

  def _finish(self, y: jax.Array) -> jax.Array:
    if self.mode == CONNECTIVITY:
      y = gate(y)
      self.sow("intermediates", "reach", y)
      y = self.perturb("coreach", y)
    elif self.rescale:
      y = rescale(y, self.mode)
    return y


class Dense(_ModeOutput, nn.Dense):
  """`nn.Dense` (kernel (in, out)) with the zoo's initializer and a mode.

  rescale: in linear mode, rescale the output (False inside residual branches).
  """

  mode: str = STANDARD
  rescale: bool = True
  kernel_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._finish(super().__call__(x))


class Conv(_ModeOutput, nn.Conv):
  """`nn.Conv` (NHWC inputs, HWIO kernel) with the zoo's initializer and a mode.

  rescale: in linear mode, rescale the output (False inside residual branches).
  """

  mode: str = STANDARD
  rescale: bool = True
  kernel_init: Callable = kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self._finish(super().__call__(x))


class Norm(nn.BatchNorm):
  """`nn.BatchNorm` (momentum 0.99 as in Flax and Keras, eps 1e-5) in standard mode,
  the identity otherwise.

  ``train=True`` normalizes with batch statistics and updates the running averages
  ('batch_stats'); ``train=False`` uses the running averages.
  """

  mode: str = STANDARD
  momentum: float = 0.99
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.mode != STANDARD:
      return x
    return super().__call__(x, use_running_average=not train)


def relu(x: jax.Array, mode: str) -> jax.Array:
  """ReLU; identity when linearized; the binary gate in connectivity mode."""
  if mode == CONNECTIVITY:
    return gate(x)
  if mode == LINEAR:
    return x
  return nn.relu(x)


def pool(
  x: jax.Array,
  kind: str,
  window: int,
  mode: str,
  stride: int | None = None,
  padding: str | Sequence = "VALID",
) -> jax.Array:
  """Max or average pooling (NHWC); average in linear and connectivity modes."""
  if kind not in ("max", "avg"):
    raise ValueError(f"kind={kind!r} is not a pooling kind; allowed: 'max', 'avg'.")
  shape, strides = (window, window), (stride or window,) * 2
  if mode == STANDARD and kind == "max":
    return nn.max_pool(x, shape, strides, padding)
  # Average pooling connects every position of the window to its output.
  y = nn.avg_pool(x, shape, strides, padding)
  return gate(y) if mode == CONNECTIVITY else y


def global_avg_pool(x: jax.Array, mode: str) -> jax.Array:
  """Mean over the spatial axes: [B, H, W, C] -> [B, C]."""
  y = jnp.mean(x, axis=(1, 2))
  return gate(y) if mode == CONNECTIVITY else y


def add(x: jax.Array, y: jax.Array, mode: str) -> jax.Array:
  """Residual sum; an OR of reachabilities in connectivity mode."""
  s = x + y
  return gate(s) if mode == CONNECTIVITY else s


def flatten(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, H*W*C] in row-major (H, W, C) order."""
  return x.reshape(x.shape[0], -1)


# ---- vgg.py
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
  mode: str = STANDARD

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    i = 0
    for item in self.config:
      if item == "M":
        x = pool(x, "max", 2, self.mode)
        continue
      # Two-digit names keep the params tree (sorted keys) in input-to-output order.
      x = Conv(item, (3, 3), padding="SAME", mode=self.mode, name=f"conv_{i:02d}")(x)
      x = Norm(mode=self.mode, name=f"norm_{i:02d}")(x, train)
      x = relu(x, self.mode)
      i += 1
    x = flatten(x)
    return Dense(self.num_classes, mode=self.mode, name="dense")(x)


# ---- resnet.py
class BasicBlock(nn.Module):
  """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x)); no biases.

  The shortcut is a 1x1 conv + BN where the shape changes, the identity otherwise.
  In linear (SynFlow) mode the block rescales its output after the sum, where every
  path meets, not inside the branches (see :func:`layers.rescale`).
  """

  features: int
  stride: int = 1
  mode: str = STANDARD

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: Conv(
      f,
      (k, k),
      strides=(s, s),
      padding="SAME",
      use_bias=False,
      rescale=False,
      mode=self.mode,
      name=name,
    )
    y = conv(self.features, 3, self.stride, "conv_1")(x)
    y = Norm(mode=self.mode, name="norm_1")(y, train)
    y = relu(y, self.mode)
    y = conv(self.features, 3, 1, "conv_2")(y)
    y = Norm(mode=self.mode, name="norm_2")(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, "shortcut_conv")(x)
      x = Norm(mode=self.mode, name="shortcut_norm")(x, train)
    return rescale(relu(add(y, x, self.mode), self.mode), self.mode)


class ResNet18(nn.Module):
  """Stem conv3x3(64) stride 1 (no max pool), four stages of two basic blocks
  (64, 128, 256, 512; stride 2 at the first block of stages 2-4), global average
  pool, Dense without bias. Input [B, 64, 64, 3] -> logits [B, classes].
  """

  num_classes: int = 200
  mode: str = STANDARD

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Names sort in input-to-output order: stage0 (stem) ... stage5 (head).
    x = Conv(64, (3, 3), padding="SAME", use_bias=False, mode=self.mode, name="stage0_conv")(x)
    x = Norm(mode=self.mode, name="stage0_norm")(x, train)
    x = relu(x, self.mode)
    for stage, features in enumerate((64, 128, 256, 512), start=1):
      for block in range(2):
        stride = 2 if stage > 1 and block == 0 else 1
        x = BasicBlock(features, stride, mode=self.mode, name=f"stage{stage}_block{block}")(
          x, train
        )
    x = global_avg_pool(x, self.mode)
    return Dense(self.num_classes, use_bias=False, mode=self.mode, name="stage5_dense")(x)


# ---- effective.py (the sweep)
@flax.struct.dataclass
class Connectivity:
  """Result of one sweep.

  masks: effective masks (bool, shaped like the input masks).
  potential: weights that are or would be active if unmasked: some position joins a
    reachable source unit to a co-reachable destination unit (bool, like masks).
  active_units: {layer path: number of active output units} per Dense/Conv layer,
    input-to-output order; a unit is one neuron, or one channel at one position.
  total_units: {layer path: number of output units}.
  active_inputs / total_inputs: input units (pixels x channels) on some path.
  """

  masks: Masks
  potential: Masks
  active_units: dict
  active_inputs: Any
  total_units: dict = flax.struct.field(pytree_node=False)
  total_inputs: int = flax.struct.field(pytree_node=False)


class _FrozenDict(dict):
  """A hashable dict for static pytree metadata."""

  def __hash__(self):
    return hash(tuple(self.items()))


@functools.lru_cache(maxsize=64)
def _sweep_parts(model: nn.Module, input_shape: tuple[int, ...]):
  conn = model.clone(mode=CONNECTIVITY)
  x = jnp.ones((1,) + input_shape, jnp.float32)
  shapes = jax.eval_shape(conn.init, jax.random.key(0), x)
  standard = jax.eval_shape(model.clone(mode=STANDARD).init, jax.random.key(0), x)
  return conn, x, shapes["params"], shapes.get("perturbations", {}), standard["params"]


def connectivity_sweep(
  model: nn.Module, input_shape, units: bool = True
) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` for ``model`` on one example
  of ``input_shape``. For use inside other jitted code (no input validation).
  ``units=False`` skips the unit counts (active_units and active_inputs are then
  empty / None), which is what searches that only need the masks want."""
  conn, x, param_shapes, perturb_shapes, _ = _sweep_parts(model, tuple(input_shape))

  def sweep(masks: Masks) -> Connectivity:
    by_path = {
      masks_lib.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(masks, is_leaf=lambda v: v is None)
      if m is not None
    }

    def weight(path, shape):
      m = by_path.get(masks_lib.path_str(path))
      return jnp.zeros(shape.shape, jnp.float32) if m is None else m.astype(jnp.float32)

    params = jax.tree_util.tree_map_with_path(weight, param_shapes)
    perturb = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), perturb_shapes)

    def forward(params, perturb, x):
      out, state = conn.apply(
        {"params": params, "perturbations": perturb}, x, mutable=["intermediates"]
      )
      return out, state["intermediates"]

    if units:
      out, vjp, reach = jax.vjp(forward, params, perturb, x, has_aux=True)
      g_params, g_perturb, g_x = vjp(jnp.ones_like(out))
    else:
      out, vjp = jax.vjp(lambda p: conn.apply({"params": p}, x), params)
      (g_params,) = vjp(jnp.ones_like(out))
    g_kernels = {masks_lib.path_str(p): g for p, g in jax.tree_util.tree_leaves_with_path(g_params)}
    potential = jax.tree_util.tree_map_with_path(
      lambda p, m: None if m is None else g_kernels[masks_lib.path_str(p)] > 0,
      masks,
      is_leaf=lambda v: v is None,
    )
    effective = masks_lib.map_masks(lambda m, live: m & live, masks, potential)
    if not units:
      return Connectivity(effective, potential, {}, None, _FrozenDict(), 0)

    active, total = {}, {}
    reach_flat = {
      masks_lib.path_str(p[:-2]): r for p, r in jax.tree_util.tree_leaves_with_path(reach)
    }
    for p, g in jax.tree_util.tree_leaves_with_path(g_perturb):
      layer = masks_lib.path_str(p[:-1])
      is_active = (reach_flat[layer] > 0) & (g > 0)
      active[layer] = jnp.sum(is_active)
      total[layer] = int(np.prod(g.shape))
    return Connectivity(
      effective, potential, active, jnp.sum(g_x > 0), _FrozenDict(total), int(np.prod(x.shape))
    )

  return sweep


@functools.lru_cache(maxsize=64)
def _jitted_sweep(model: nn.Module, input_shape: tuple[int, ...]):
  return jax.jit(connectivity_sweep(model, input_shape))
