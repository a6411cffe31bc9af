"""Exact effective masks by one binary connectivity sweep (method.md section 1).

A weight is *active* when it is unmasked and lies on a directed input-to-output
path of the unit-level graph (convolutions unrolled over positions, every pooling
position connected). With reach(u) = "u is reachable from the input" and
coreach(u) = "u reaches an output":

    reach(v)   = OR_{u -> v unmasked} reach(u)        (inputs are reachable)
    coreach(u) = OR_{u -> v unmasked} coreach(v)      (outputs are co-reachable)
    active(w: u -> v) = mask(w) AND reach(u) AND coreach(v)

Both ORs are one forward and one backward pass of the network in connectivity mode
(weights = mask, biases = 0, normalization = identity, pooling = average, every
activation the gate 1[x > 0] whose backward is 1[g > 0]); the kernel gradient of
that pass is sum_positions reach(u) * coreach(v), positive exactly for active
weights. Values stay binary between layers, so the result is exact in float32 for
any depth: no path counts, no overflow. A unit is active when reach AND coreach.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as masks_lib
from sparsejax import models
from sparsejax.models import layers

Masks = Any


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
  conn = model.clone(mode=layers.CONNECTIVITY)
  x = jnp.ones((1,) + input_shape, jnp.float32)
  shapes = jax.eval_shape(conn.init, jax.random.key(0), x)
  standard = jax.eval_shape(model.clone(mode=layers.STANDARD).init, jax.random.key(0), x)
  return conn, x, shapes["params"], shapes.get("perturbations", {}), standard["params"]


def connectivity_sweep(model: nn.Module, input_shape, units: bool = True
                       ) -> Callable[[Masks], Connectivity]:
  """The pure, jit-able sweep ``masks -> Connectivity`` for ``model`` on one example
  of ``input_shape``. For use inside other jitted code (no input validation).
  ``units=False`` skips the unit counts (active_units and active_inputs are then
  empty / None), which is what searches that only need the masks want."""
  conn, x, param_shapes, perturb_shapes, _ = _sweep_parts(
      models.check_model(model), models.check_input_shape(input_shape))

  def sweep(masks: Masks) -> Connectivity:
    by_path = {masks_lib.path_str(p): m for p, m in
               jax.tree_util.tree_leaves_with_path(masks, is_leaf=lambda v: v is None)
               if m is not None}

    def weight(path, shape):
      m = by_path.get(masks_lib.path_str(path))
      return jnp.zeros(shape.shape, jnp.float32) if m is None else m.astype(jnp.float32)

    params = jax.tree_util.tree_map_with_path(weight, param_shapes)
    perturb = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), perturb_shapes)

    def forward(params, perturb, x):
      out, state = conn.apply({"params": params, "perturbations": perturb}, x,
                              mutable=["intermediates"])
      return out, state["intermediates"]

    if units:
      out, vjp, reach = jax.vjp(forward, params, perturb, x, has_aux=True)
      g_params, g_perturb, g_x = vjp(jnp.ones_like(out))
    else:
      out, vjp = jax.vjp(lambda p: conn.apply({"params": p}, x), params)
      (g_params,) = vjp(jnp.ones_like(out))
    g_kernels = {masks_lib.path_str(p): g for p, g in
                 jax.tree_util.tree_leaves_with_path(g_params)}
    potential = jax.tree_util.tree_map_with_path(
        lambda p, m: None if m is None else g_kernels[masks_lib.path_str(p)] > 0, masks,
        is_leaf=lambda v: v is None)
    effective = masks_lib.map_masks(lambda m, live: m & live, masks, potential)
    if not units:
      return Connectivity(effective, potential, {}, None, _FrozenDict(), 0)

    active, total = {}, {}
    reach_flat = {masks_lib.path_str(p[:-2]): r for p, r in
                  jax.tree_util.tree_leaves_with_path(reach)}
    for p, g in jax.tree_util.tree_leaves_with_path(g_perturb):
      layer = masks_lib.path_str(p[:-1])
      is_active = (reach_flat[layer] > 0) & (g > 0)
      active[layer] = jnp.sum(is_active)
      total[layer] = int(np.prod(g.shape))
    return Connectivity(effective, potential, active, jnp.sum(g_x > 0), _FrozenDict(total),
                        int(np.prod(x.shape)))

  return sweep


@functools.lru_cache(maxsize=64)
def _jitted_sweep(model: nn.Module, input_shape: tuple[int, ...]):
  return jax.jit(connectivity_sweep(model, input_shape))


def connectivity(model: nn.Module, masks: Masks, input_shape) -> Connectivity:
  """Effective masks and active units of ``model`` under ``masks``.

  Args:
    model: a zoo model or any flax module built from :mod:`sparsejax.models.layers`
      that has a ``mode`` field.
    masks: bool masks shaped like the model's params (None at non-prunable leaves).
    input_shape: one example's shape without the batch axis, e.g. (32, 32, 3).
  """
  input_shape = models.check_input_shape(input_shape)
  *_, standard_params = _sweep_parts(models.check_model(model), input_shape)
  masks_lib.validate(masks, standard_params)
  result = _jitted_sweep(model, input_shape)(masks)
  return result.replace(active_units={k: int(v) for k, v in result.active_units.items()},
                        active_inputs=int(result.active_inputs))


def effective_masks(model: nn.Module, masks: Masks, input_shape) -> Masks:
  """The active weights: unmasked and on some input-to-output path (bool, like masks).

  active(w: u -> v) = mask(w) AND reach(u) AND coreach(v) (method.md section 1).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from sparsejax import effective, masks, models
    >>> model = models.create("lenet300100")
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))["params"]
    >>> m = masks.ones(params)
    >>> m["dense_1"]["kernel"] = jnp.zeros_like(m["dense_1"]["kernel"])  # cut layer 2
    >>> eff = effective.effective_masks(model, m, (28, 28, 1))
    >>> int(eff["dense_0"]["kernel"].sum()), int(eff["dense_2"]["kernel"].sum())
    (0, 0)
  """
  return connectivity(model, masks, input_shape).masks


def effective_sparsity(model: nn.Module, masks: Masks, input_shape) -> float:
  """1 - active weights / prunable weights (1.0 for a disconnected network)."""
  return masks_lib.direct_sparsity(effective_masks(model, masks, input_shape))


def effective_compression(model: nn.Module, masks: Masks, input_shape) -> float:
  """1 / effective density; inf for a disconnected network."""
  return masks_lib.compression(effective_masks(model, masks, input_shape))


def active_units(model: nn.Module, masks: Masks, input_shape) -> dict[str, tuple[int, int]]:
  """{layer path: (active, total)} output units per Dense/Conv layer."""
  c = connectivity(model, masks, input_shape)
  return {k: (c.active_units[k], c.total_units[k]) for k in c.active_units}
