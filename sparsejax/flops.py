"""FLOPs and parameter memory per layer: dense, direct and effective.

Per linear op (Dense, Conv) with kernel W and P output positions (one example; P = 1 for
a Dense layer), counting a multiply-accumulate as 2 FLOPs and nothing else (biases,
normalization, activations, pooling and embedding lookups, which read a row and
multiply nothing, are not counted; a weight used by several ops, e.g. a tied embedding
used as a lookup and as the output layer, counts each op's):

    dense FLOPs     = 2 * |W| * P
    direct FLOPs    = 2 * sum(mask) * P                       (unmasked weights)
    effective FLOPs = 2 * sum_w mask(w) * #{positions where w joins a reachable
                      source unit to a co-reachable destination unit}

The effective count is exact: it is the kernel cotangent of the reachability sweep
(sum over positions of reach(u) * coreach(v), :func:`sparsejax.connectivity.position_counts`),
so taps that only read zero padding and weights on no input-to-output path cost nothing.
Parameters: dense |W|, direct sum(mask), effective sum(effective mask); bytes = params
times the kernel's item size (values only, no index storage). Output positions come from
the traced program (the output shape of each linear op), so any traceable model works.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from sparsejax import connectivity as conn_lib
from sparsejax import tracing


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs (2 per multiply-accumulate, one example) and kernel parameters/bytes."""

  flops_dense: int
  flops_direct: int
  flops_effective: int
  params_dense: int
  params_direct: int
  params_effective: int
  bytes_dense: int
  bytes_direct: int
  bytes_effective: int
  positions: int = 0  # output positions (0 for the total)

  def __add__(self, other: Cost) -> Cost:
    fields = [f.name for f in dataclasses.fields(self) if f.name != "positions"]
    return Cost(**{f: getattr(self, f) + getattr(other, f) for f in fields})

  def as_dict(self, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in dataclasses.asdict(self).items() if k != "positions"}


@functools.lru_cache(maxsize=64)
def _jitted_counts(traced):
  return jax.jit(conn_lib.position_counts(traced.program, traced.prunable))


def costs(model, masks, input_shape=None, **kw) -> dict[str, Cost]:
  """{layer path: Cost} per prunable linear op in input-to-output order, and 'total'.

  Args: as :func:`sparsejax.effective.connectivity` (``masks=None``: dense; the mask
  tree is the prunable set).
  """
  traced = tracing.trace(model, input_shape, **kw)
  if masks is None:
    masks = traced.ones()
  traced = traced.masked(masks)
  prog = traced.program
  flat = traced.params_spec[0].flatten_up_to(masks)
  counts = _jitted_counts(traced)([flat[i] for i in traced.prunable])
  names = conn_lib.site_names(prog)
  site_of = {}  # leaf -> (its first site's name, output positions over its MAC sites)
  for n, (k, leaf) in zip(names, prog.sites):
    if leaf is not None:
      shape = prog.eqns[k].out_avals[0].shape
      pos = 0 if prog.eqns[k].lookup else int(np.prod(shape[:-1])) // int(shape[0])
      name, before = site_of.get(leaf, (n, 0))
      site_of[leaf] = (name, before + pos)
  batch = int(prog.x_shapes[0][0]) if prog.x_shapes and len(prog.x_shapes[0]) else 1
  out, total = {}, None
  for i, c in zip(traced.prunable, counts):
    name, pos = site_of[i]
    m = np.asarray(flat[i], bool)
    size = int(np.prod(traced.shapes[i]))
    item = np.dtype(traced.params_spec[1][i][1]).itemsize
    direct = int(m.sum())
    live = np.asarray(c)
    eff = int((live > 0).sum())
    cost = Cost(
      flops_dense=2 * size * pos,
      flops_direct=2 * direct * pos,
      flops_effective=2 * int(round(float(live.astype(np.float64).sum()))) // batch,
      params_dense=size,
      params_direct=direct,
      params_effective=eff,
      bytes_dense=size * item,
      bytes_direct=direct * item,
      bytes_effective=eff * item,
      positions=pos,
    )
    out[name] = cost
    total = cost if total is None else total + cost
  out["total"] = dataclasses.replace(total, positions=0)
  return out


def total(model, masks, input_shape=None, **kw) -> Cost:
  """The 'total' entry of :func:`costs`."""
  return costs(model, masks, input_shape, **kw)["total"]


def network_bytes(variables) -> int:
  """Bytes of every array in ``variables`` (all collections): a dense network's size."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(variables)))


__all__ = ["Cost", "costs", "total", "network_bytes"]
