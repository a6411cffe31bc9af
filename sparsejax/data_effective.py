"""Data-dependent effective sparsity: the weights on a path of units that fire on real data.

Effective sparsity (:mod:`sparsejax.effective`) asks which weights lie on an input-output
path of the masked graph. A trained ReLU (or top-k, :mod:`sparsejax.ephemeral`) network
also has units that are exactly 0 on every input it sees. Per example e, a unit (one
scalar value of the traced program: a neuron, a channel at one position, an input pixel)
is *active* when its value is nonzero (an input token id always is), and

    reach_e(v)   = nz_e(v) AND OR_{u -> v unmasked} reach_e(u)      (nonzero inputs reach)
    coreach_e(u) = nz_e(u) AND OR_{u -> v unmasked} coreach_e(v)    (nonzero outputs)
    w: u -> v is *effective on the data* when mask(w) AND OR_e reach_e(u) coreach_e(v).

This is the connectivity sweep of :mod:`sparsejax.connectivity` (one forward and one
backward reachability pass of the traced program) with every input-dependent value's
reach multiplied by that example's nonzero pattern: the real program is evaluated on the
data first (the patterns), then the gated sweep runs on a batch of examples at once (the
program traced at that batch; examples never mix in inference mode) and the kernel
cotangents, sum_{e, positions} reach_e(u) coreach_e(v), are positive exactly for the
weights effective on some example: the OR over the data set. Exact in float32 (the
values are {0, 1} indicators, gated at every sum). Products of two input-dependent values
(attention) read the real nonzero patterns as their support.

Per layer (each linear op, input-to-output order) :func:`data_effective` reports the units
(output units of the op: neurons, channels at positions) that are structurally active, the
units active on some example, the fraction never active, the channels never active, and
the op input's activation sparsity (fraction of exact zeros per example, averaged); in
total, direct, effective and data-effective compression.

Compaction (only when asked: :func:`compact_on_data`, ``data_effective(..., compact=True)``)
removes units that never fire on the data: the weights reading an input that is 0 on every
example (at every position where the weight applies) are masked, which changes nothing on
the data (0 * w = 0), and :func:`sparsejax.compact.compact` removes the units left without
a live outgoing weight. The compacted network computes the original function *on the
data*; on other inputs a removed unit may fire, so the function there changes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import compact as compact_lib
from sparsejax import connectivity as conn_lib
from sparsejax import effective, tracing
from sparsejax import masks as masks_lib
from sparsejax.connectivity.program import bind
from sparsejax.connectivity.semantics import Evaluator

PyTree = Any


# --------------------------------------------------------------------------- the sweep


class _Gated(Evaluator):
  """Reachability semantics with every input-dependent value's reach multiplied by its
  nonzero pattern on the data (``patterns``: value id -> float32 {0, 1} of the value's
  shape); products read the patterns as the support of their factors."""

  def __init__(self, prog, patterns: dict):
    super().__init__(prog, "reach")
    self._patterns = patterns

  @property
  def support(self):
    return self._patterns.__getitem__

  @support.setter
  def support(self, value):
    del value  # the data's own nonzero patterns are the support (see the class docstring)

  def input_eqn(self, e, vals, kinds, origins):
    outs, origin = super().input_eqn(e, vals, kinds, origins)
    return [o * self._patterns[i] for o, i in zip(outs, e.outs)], origin


def _values(prog: conn_lib.Program, params: list, extra: list, xs: list) -> dict:
  """Every value of the program on real inputs: {value id: array}."""
  env = dict(zip(prog.param_ids, params))
  env.update(zip(prog.extra_ids, extra))
  env.update(zip(prog.x_ids, xs))
  get = lambda i: env[i] if i in env else prog.consts[i]
  for e in prog.eqns:
    env.update(zip(e.outs, bind(e, *[get(i) for i in e.ins])))
  return env


def _x_operand(prog: conn_lib.Program, k: int) -> int | None:
  """The input-dependent operand (index) of the linear op ``k`` when it has exactly one
  and it is float (a lookup's indices are not activations)."""
  e = prog.eqns[k]
  xs = [j for j in range(2) if prog.kind[e.ins[j]] == "x"]
  if len(xs) != 1 or e.lookup:
    return None
  return xs[0]


def _chunk_fn(traced: tracing.Traced, with_usage: bool):
  """The jitted ``(params, extra, mask patterns, x, valid) -> chunk results`` of one batch
  of examples (the program traced at that batch): potential per prunable leaf (kernel
  cotangent > 0), per-site unit activity (OR over the batch), per-site input zero counts,
  and with ``with_usage`` the weights that read a nonzero input somewhere."""
  prog, prunable = traced.program, tuple(traced.prunable)
  sites = prog.sites
  site_shapes = [prog.eqns[k].out_avals[0].shape for k, _ in sites]
  leaf_of_param = {pid: l for l, pid in enumerate(prog.param_ids)}

  def run(params, extra, kernels, x, valid):
    vals = _values(prog, params, extra, [x])
    pats = {
      i: (vals[i] != 0).astype(jnp.float32) for e in prog.eqns if e.kind == "x" for i in e.outs
    }
    # An input pixel at exactly 0 is off; a token id is a row of a lookup, never "off".
    on = x != 0 if jnp.issubdtype(x.dtype, jnp.floating) else jnp.ones(x.shape, bool)
    pats[prog.x_ids[0]] = on.astype(jnp.float32)
    ev = _Gated(prog, pats)
    base = [jnp.ones(s, jnp.float32) for s in prog.param_shapes]
    ones_extra = [jnp.ones(s, jnp.float32) for s in prog.extra_shapes]
    perturb = [jnp.zeros(s, jnp.float32) for s in site_shapes]

    def f(ks, pert, x_pat):
      ps = list(base)
      for i, k in zip(prunable, ks):
        ps[i] = k
      outs, reach_at = ev.run(ps, ones_extra, [x_pat], perturb=pert)
      return outs, [reach_at[n] for n in range(len(sites))]

    outs, vjp, reach = jax.vjp(f, kernels, perturb, pats[prog.x_ids[0]], has_aux=True)
    g, g_pert, _ = vjp([jnp.ones_like(o) for o in outs])
    w = valid.astype(jnp.float32)
    lead = lambda a: a.reshape(a.shape[0], -1)
    units = [
      jnp.any((lead(r) > 0) & (lead(c) > 0) & (valid[:, None]), axis=0)
      for r, c in zip(reach, g_pert)
    ]
    zeros = []
    for k, _ in sites:
      j = _x_operand(prog, k)
      if j is None:
        zeros.append(jnp.zeros((), jnp.float32))
        continue
      a = lead(vals[prog.eqns[k].ins[j]])
      zeros.append(jnp.sum(jnp.mean((a == 0).astype(jnp.float32), axis=1) * w))
    out = {"potential": [gk > 0 for gk in g], "units": units, "zeros": zeros}
    if with_usage:
      out["usage"] = _usage(prog, prunable, vals, leaf_of_param, valid)
    return out

  return jax.jit(run)


def _usage(prog, prunable, vals, leaf_of_param, valid) -> list:
  """Per prunable leaf: bool, the weight multiplies a nonzero input for some valid
  example at some position (the sum over sites reading the leaf directly of the op's
  weight cotangent with the input's nonzero pattern); a leaf some op reads through a
  parameter computation counts as used everywhere (nothing is removed from it)."""
  used = {l: None for l in prunable}
  indirect = set()
  for k, leaf in prog.sites:
    e = prog.eqns[k]
    j = _x_operand(prog, k)
    if leaf is None or leaf not in used:
      continue
    w_id = e.ins[1 - j] if j is not None else None
    if j is None or leaf_of_param.get(w_id) != leaf:
      indirect.add(leaf)
      continue
    a = vals[e.ins[j]]
    pat = (a != 0).astype(jnp.float32)
    pat = pat * valid.reshape((-1,) + (1,) * (pat.ndim - 1)).astype(jnp.float32)

    def total(w, e=e, j=j, pat=pat):  # linear in w: its gradient counts nonzero inputs
      args = [pat, w] if j == 0 else [w, pat]
      return jnp.sum(bind(e, *args, preferred_element_type=jnp.float32)[0])

    g = jax.grad(total)(jnp.ones(prog.param_shapes[leaf], jnp.float32))
    used[leaf] = g > 0 if used[leaf] is None else used[leaf] | (g > 0)
  return [
    jnp.ones(prog.param_shapes[l], bool) if (l in indirect or used[l] is None) else used[l]
    for l in prunable
  ]


@functools.lru_cache(maxsize=32)
def _compiled(traced: tracing.Traced, with_usage: bool):
  return _chunk_fn(traced, with_usage)


# --------------------------------------------------------------------------- the API


@dataclasses.dataclass
class DataEffective:
  """What :func:`data_effective` measured.

  masks: the weights effective on the data (bool, like the masks).
  effective_masks: the structurally effective weights (on any input).
  examples: examples read.
  layers: per linear op, input-to-output order: {"layer", "units" (output units per
    example), "active_units" (structurally), "data_active_units" (active on some
    example), "never_active_fraction" (1 - data_active / units), "channels",
    "never_active_channels" (last-axis channels with no active unit at any position on
    any example), "activation_sparsity" (the op input's fraction of exact zeros per
    example, averaged; None for a lookup)}.
  direct_compression, effective_compression, data_effective_compression: total
    prunable weights over kept, structurally active and data-active weights (inf when
    none).
  compacted: with ``compact=True``, (model, variables, masks) of the network without
    the units that never fire (:func:`compact_on_data`), else None.
  """

  masks: PyTree
  effective_masks: PyTree
  examples: int
  layers: list
  direct_compression: float
  effective_compression: float
  data_effective_compression: float
  compacted: tuple | None = None

  def as_dict(self) -> dict:
    """The scalar results (no arrays): examples, layers and the three compressions."""
    return {
      "examples": self.examples,
      "layers": self.layers,
      "direct_compression": self.direct_compression,
      "effective_compression": self.effective_compression,
      "data_effective_compression": self.data_effective_compression,
    }


def _as_inputs(inputs) -> np.ndarray:
  """``inputs`` as a host array (float as float32, the dtype the program is traced in)."""
  x = np.asarray(jax.device_get(inputs))
  return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else x


def _check_inputs(inputs, traced_1: tracing.Traced) -> np.ndarray:
  shape = traced_1.input_shape
  if not hasattr(inputs, "shape") or tuple(inputs.shape[1:]) != tuple(shape):
    raise ValueError(
      f"inputs of shape {getattr(inputs, 'shape', type(inputs).__name__)} must be a batch "
      f"of examples of the model's input shape {tuple(shape)}: [N, {', '.join(map(str, shape))}]."
    )
  if len(inputs) == 0:
    raise ValueError("inputs is empty: data-effective sparsity needs at least one example.")
  return inputs


def _default_apply_kwargs(model) -> dict:
  """{'train': False} for a Flax module whose call takes ``train`` (inference mode:
  examples do not mix in batch norm), else {}."""
  module = model
  while isinstance(getattr(module, "model", None), nn.Module):  # a wrapper (Sparsified)
    module = module.model
  if not isinstance(module, nn.Module):
    return {}
  return {"train": False} if "train" in inspect.signature(type(module).__call__).parameters else {}


def _split(model, variables):
  if isinstance(model, nn.Module):
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}
  return variables, {}


def _sweep_data(model, variables, masks, inputs, *, batch_size, apply_kwargs, with_usage):
  """(traced at batch 1, traced at the chunk batch, accumulated chunk results)."""
  inputs = _as_inputs(inputs)
  if inputs.ndim < 2 or len(inputs) == 0:
    raise ValueError(
      f"inputs of shape {inputs.shape} must be a non-empty batch of examples [N, ...]."
    )
  example = jax.ShapeDtypeStruct((1, *inputs.shape[1:]), jnp.dtype(inputs.dtype))
  kw = dict(variables=variables, apply_kwargs=apply_kwargs)
  try:
    traced_1 = tracing.trace(model, example, **kw)
  except ValueError as err:
    raise ValueError(
      f"inputs of shape {inputs.shape} do not fit the model (one example: "
      f"{tuple(inputs.shape[1:])}): {err}"
    ) from None
  traced_1 = traced_1.masked(masks)
  _check_inputs(inputs, traced_1)
  b = int(min(batch_size, len(inputs)))
  chunk = jax.ShapeDtypeStruct((b, *inputs.shape[1:]), jnp.dtype(inputs.dtype))
  traced = tracing.trace(model, chunk, **kw).masked(masks)
  params, extra = _split(model, variables)
  params = masks_lib.apply(params, masks)
  p_flat = traced.params_spec[0].flatten_up_to(params)
  e_flat = jax.tree.leaves(extra)
  kernels = [
    jnp.asarray(m, jnp.float32)
    for m in (traced.params_spec[0].flatten_up_to(masks)[i] for i in traced.prunable)
  ]
  fn = _compiled(traced, with_usage)
  acc = None
  for start in range(0, len(inputs), b):
    x = np.asarray(inputs[start : start + b])
    n = len(x)
    if n < b:  # pad with copies of the first example: the OR is unchanged
      x = np.concatenate([x, np.repeat(x[:1], b - n, axis=0)])
    valid = np.arange(b) < n
    got = fn(p_flat, e_flat, kernels, jnp.asarray(x), jnp.asarray(valid))
    acc = got if acc is None else _merge(acc, got)
  return traced_1, traced, jax.device_get(acc)


def _merge(a: dict, b: dict) -> dict:
  out = {
    "potential": [x | y for x, y in zip(a["potential"], b["potential"])],
    "units": [x | y for x, y in zip(a["units"], b["units"])],
    "zeros": [x + y for x, y in zip(a["zeros"], b["zeros"])],
  }
  if "usage" in a:
    out["usage"] = [x | y for x, y in zip(a["usage"], b["usage"])]
  return out


def _unflat(traced: tracing.Traced, leaves: Sequence) -> PyTree:
  full = [None] * traced.params_spec[0].num_leaves
  for i, v in zip(traced.prunable, leaves):
    full[i] = jnp.asarray(v)
  return traced.params_spec[0].unflatten(full)


def _compression(total: int, kept: int) -> float:
  return total / kept if kept else float("inf")


def data_effective(
  model,
  variables: PyTree,
  masks: PyTree,
  inputs,
  *,
  batch_size: int = 256,
  apply_kwargs: dict | None = None,
  compact: bool = False,
) -> DataEffective:
  """Data-dependent effective sparsity of ``model`` under ``masks`` on ``inputs``.

  Args:
    model: a Flax module (zoo, user-written, or an :class:`sparsejax.ephemeral.Sparsified`
      one: its top-k zeros count as units that do not fire) or a function
      ``apply(params, x)``.
    variables: its variables ({'params': ..., 'batch_stats': ...}; a function's params);
      the masked weights are zeroed before evaluation.
    masks: bool masks shaped like the params (None elsewhere): the prunable set.
    inputs: the data the model reads, preprocessed: [N, *input shape] (float, or int
      token ids).
    batch_size: examples per sweep (the program is traced at this batch once).
    apply_kwargs: keyword arguments of the model's call; default {'train': False} for a
      Flax module whose call takes ``train`` (inference mode: examples do not mix), else
      {}.
    compact: also compact the network without the units that never fire on ``inputs``
      (:func:`compact_on_data`; zoo networks only): it then computes the same function
      on these inputs only.

  Returns:
    A :class:`DataEffective`.

  Raises:
    ValueError: inputs that do not fit the model, masks that do not fit its params.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
  if not isinstance(compact, bool):
    raise ValueError(f"compact={compact!r} must be True or False.")
  if apply_kwargs is None:
    apply_kwargs = _default_apply_kwargs(model)
  traced_1, traced, acc = _sweep_data(
    model,
    variables,
    masks,
    inputs,
    batch_size=batch_size,
    apply_kwargs=apply_kwargs,
    with_usage=False,
  )
  potential = _unflat(traced, acc["potential"])
  data_masks = masks_lib.map_masks(lambda m, p: jnp.asarray(m) & p, masks, potential)
  conn = effective.connectivity(traced_1, masks)
  names = conn_lib.site_names(traced.program)
  b = traced.input.shape[0]
  n = len(inputs)
  layers = []
  for s, name in enumerate(names):
    units = np.asarray(acc["units"][s]).reshape(-1)
    shape = traced.program.eqns[traced.program.sites[s][0]].out_avals[0].shape
    per_example = int(np.prod(shape)) // b
    channels = int(shape[-1]) if len(shape) > 1 else 1
    by_channel = units.reshape(-1, channels).any(axis=0)
    k = traced.program.sites[s][0]
    active = int(units.sum())
    layers.append(
      {
        "layer": name,
        "units": per_example,
        "active_units": int(conn.active_units.get(name, 0)),
        "data_active_units": active,
        "never_active_fraction": 1.0 - active / per_example,
        "channels": channels,
        "never_active_channels": int(channels - by_channel.sum()),
        "activation_sparsity": (
          None if _x_operand(traced.program, k) is None else float(acc["zeros"][s]) / n
        ),
      }
    )
  kept, total = masks_lib.count(masks)
  result = DataEffective(
    masks=data_masks,
    effective_masks=conn.masks,
    examples=n,
    layers=layers,
    direct_compression=_compression(total, kept),
    effective_compression=_compression(total, masks_lib.count(conn.masks)[0]),
    data_effective_compression=_compression(total, masks_lib.count(data_masks)[0]),
  )
  if compact:
    result.compacted = compact_on_data(
      model, variables, masks, inputs, batch_size=batch_size, apply_kwargs=apply_kwargs
    )
  return result


def firing_masks(
  model,
  variables: PyTree,
  masks: PyTree,
  inputs,
  *,
  batch_size: int = 256,
  apply_kwargs: dict | None = None,
) -> PyTree:
  """``masks`` without the weights that read an input which is 0 on every example of
  ``inputs`` (at every position where the weight applies): the same function on these
  inputs (those weights add 0 there), possibly another one elsewhere. Arguments as
  :func:`data_effective`."""
  if apply_kwargs is None:
    apply_kwargs = _default_apply_kwargs(model)
  _, traced, acc = _sweep_data(
    model,
    variables,
    masks,
    inputs,
    batch_size=batch_size,
    apply_kwargs=apply_kwargs,
    with_usage=True,
  )
  usage = _unflat(traced, acc["usage"])
  return masks_lib.map_masks(lambda m, u: jnp.asarray(m) & u, masks, usage)


def compact_on_data(
  model,
  variables: PyTree,
  masks: PyTree,
  inputs,
  *,
  batch_size: int = 256,
  apply_kwargs: dict | None = None,
):
  """The network without the units that never fire on ``inputs``: ``(model, variables,
  masks)`` of :func:`sparsejax.compact.compact` applied to :func:`firing_masks` (zoo
  networks; ``fold=True``). It computes the original function on ``inputs`` (up to float
  rounding) and, in general, another function on other inputs: a removed unit is one
  that is 0 on this data, not one that is 0 everywhere."""
  fired = firing_masks(
    model, variables, masks, inputs, batch_size=batch_size, apply_kwargs=apply_kwargs
  )
  input_shape = tuple(np.shape(inputs)[1:])
  return compact_lib.compact(model, variables, fired, input_shape=input_shape)


__all__ = ["DataEffective", "compact_on_data", "data_effective", "firing_masks"]
