"""Brute-force reference for effective masks (method.md section 1), independent of JAX autodiff.

For a small network given by a *spec* this module builds both

(a) a flax module made of :mod:`sparsejax.models.layers` (``SpecNet``), the thing
    ``sparsejax.effective`` is run on, and
(b) the explicit unit-level directed graph of the same network (``build_graph``):
    one unit per (tensor, position, channel), one edge per (kernel entry, output
    position) pair whose input is a real unit (zero padding is not a unit), labelled
    by the kernel entry it belongs to,

and computes reachability from all inputs and co-reachability to all outputs by plain
graph search over the unmasked edges (``reference``). Nothing here differentiates
anything; JAX is used only to build the flax module.

Spec format: a tuple of ops (hashable, so that it can be a flax module field):

  ('conv', features, kernel, stride, padding)  square kernel and stride, padding 'SAME' or
                                               'VALID'; NHWC, HWIO kernel; then Norm + ReLU
  ('dense', features)                          needs a 1-D (flattened) input; then Norm, and
                                               ReLU unless it is the last op
  ('pool', kind, window, stride)               kind 'max' or 'avg', VALID padding
  ('flatten',)                                 row-major (H, W, C) order
  ('gap',)                                     global average pool: [H, W, C] -> [C]
  ('res', features, stride)                    ResNet basic block: conv3x3/stride (no bias),
                                               Norm, ReLU, conv3x3/1 (no bias), Norm;
                                               shortcut conv1x1/stride (no bias) + Norm where
                                               stride != 1 or the channels change, the
                                               identity otherwise; add; ReLU

Layer names: op ``i`` is named ``op{i:02d}_{kind}`` (its norm ``op{i:02d}_{kind}_norm``);
inside a residual block ``conv_1``, ``conv_2``, ``shortcut_conv``. Sorted key order is
therefore the call order. The prunable layer paths, e.g. ``'op03_res/conv_1'``, are
those of ``sparsejax.masks.path_str`` without the trailing ``/kernel``.

'SAME' padding follows XLA/TensorFlow: out = ceil(n / s), total padding
max((out - 1) * s + k - n, 0), pad_low = total // 2, the extra one at the high end.
Batch norm, ReLU and biases are per-unit and do not change connectivity.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.models import layers as L

# --------------------------------------------------------------------------- (a) flax module


class ResBlock(nn.Module):
  """The spec's ('res', features, stride) block (as ResNet-18's basic block)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    def conv(f, k, s, name):
      return L.Conv(f, (k, k), strides=(s, s), padding="SAME", use_bias=False, name=name)

    y = conv(self.features, 3, self.stride, "conv_1")(x)
    y = L.Norm(name="norm_1")(y, train)
    y = nn.relu(y)
    y = conv(self.features, 3, 1, "conv_2")(y)
    y = L.Norm(name="norm_2")(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.stride, "shortcut_conv")(x)
      x = L.Norm(name="shortcut_norm")(x, train)
    return nn.relu(y + x)


class SpecNet(nn.Module):
  """The flax network of a spec (see the module docstring)."""

  spec: tuple

  @nn.compact
  def __call__(self, x, train: bool = False):
    last = len(self.spec) - 1
    for i, op in enumerate(self.spec):
      kind, name = op[0], f"op{i:02d}_{op[0]}"
      if kind == "conv":
        _, features, k, s, padding = op
        x = L.Conv(features, (k, k), strides=(s, s), padding=padding, name=name)(x)
        x = L.Norm(name=name + "_norm")(x, train)
        x = nn.relu(x)
      elif kind == "dense":
        x = L.Dense(op[1], name=name)(x)
        x = L.Norm(name=name + "_norm")(x, train)
        if i < last:
          x = nn.relu(x)
      elif kind == "pool":
        _, pool_kind, window, stride = op
        x = L.pool(x, pool_kind, window, stride=stride)
      elif kind == "flatten":
        x = L.flatten(x)
      elif kind == "gap":
        x = L.global_avg_pool(x)
      elif kind == "res":
        x = ResBlock(op[1], op[2], name=name)(x, train)
      else:
        raise ValueError(f"unknown op {op!r}")
    return x


def make_model(spec: Sequence) -> SpecNet:
  return SpecNet(spec=tuple(tuple(op) for op in spec))


# --------------------------------------------------------------------------- geometry


def conv_geometry(n: int, k: int, s: int, padding: str) -> tuple[int, int]:
  """(output size, low padding) of a convolution along one axis of size n."""
  if padding == "SAME":
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return out, total // 2
  if padding == "VALID":
    out = (n - k) // s + 1
    if out < 1:
      raise ValueError(f"VALID conv with kernel {k} does not fit size {n}")
    return out, 0
  raise ValueError(f"padding {padding!r}")


# --------------------------------------------------------------------------- (b) the graph


@dataclasses.dataclass
class Layer:
  path: str  # e.g. 'op00_conv' or 'op02_res/conv_1'
  kernel_shape: tuple
  out_ids: np.ndarray  # unit ids of the layer's output (before norm/ReLU)


@dataclasses.dataclass
class Graph:
  num_units: int
  input_ids: np.ndarray  # shaped like one input example
  output_ids: np.ndarray
  src: np.ndarray  # [E] unit ids
  dst: np.ndarray  # [E]
  layer: np.ndarray  # [E] index into `layers`, -1 for unlabeled edges (pool, add, gap)
  entry: np.ndarray  # [E] flat index into that layer's kernel (-1 if unlabeled)
  layers: list

  @property
  def paths(self) -> list[str]:
    return [l.path for l in self.layers]


class _Builder:
  def __init__(self):
    self.n = 0
    self.edges = []  # (src, dst, layer, entry) arrays
    self.layers = []

  def new(self, shape) -> np.ndarray:
    ids = np.arange(self.n, self.n + int(np.prod(shape)), dtype=np.int64).reshape(shape)
    self.n += ids.size
    return ids

  def add_edges(self, src, dst, layer=-1, entry=None):
    entry = -1 if entry is None else entry
    src, dst, entry = (a.ravel() for a in np.broadcast_arrays(src, dst, entry))
    self.edges.append((src, dst, np.full(src.shape, layer), entry))

  def conv(self, x, features, k, s, padding, path):
    if x.ndim != 3:
      raise ValueError(f"conv needs an [H, W, C] input, got {x.shape}")
    H, W, C = x.shape
    oh_n, lo_h = conv_geometry(H, k, s, padding)
    ow_n, lo_w = conv_geometry(W, k, s, padding)
    out = self.new((oh_n, ow_n, features))
    li = len(self.layers)
    self.layers.append(Layer(path, (k, k, C, features), out))
    kernel_index = np.arange(k * k * C * features).reshape(k, k, C, features)
    for oh in range(oh_n):
      for ow in range(ow_n):
        for kh in range(k):
          ih = oh * s + kh - lo_h
          if not 0 <= ih < H:
            continue  # zero padding: no unit, no edge
          for kw in range(k):
            iw = ow * s + kw - lo_w
            if not 0 <= iw < W:
              continue
            # every (cin, cout) pair of this tap at this output position
            self.add_edges(x[ih, iw, :, None], out[oh, ow, None, :], li, kernel_index[kh, kw])
    return out

  def dense(self, x, features, path):
    if x.ndim != 1:
      raise ValueError(f"dense needs a flat input, got {x.shape}")
    out = self.new((features,))
    li = len(self.layers)
    self.layers.append(Layer(path, (x.size, features), out))
    self.add_edges(
      x[:, None], out[None, :], li, np.arange(x.size * features).reshape(x.size, features)
    )
    return out

  def pool(self, x, window, s):
    H, W, C = x.shape
    oh_n, _ = conv_geometry(H, window, s, "VALID")
    ow_n, _ = conv_geometry(W, window, s, "VALID")
    out = self.new((oh_n, ow_n, C))
    for oh in range(oh_n):
      for ow in range(ow_n):
        for dh in range(window):
          for dw in range(window):
            self.add_edges(x[oh * s + dh, ow * s + dw, :], out[oh, ow, :])
    return out

  def gap(self, x):
    H, W, C = x.shape
    out = self.new((C,))
    for h in range(H):
      for w in range(W):
        self.add_edges(x[h, w, :], out)
    return out

  def add(self, a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    out = self.new(a.shape)
    self.add_edges(a, out)
    self.add_edges(b, out)
    return out


def build_graph(spec: Sequence, input_shape: Sequence[int]) -> Graph:
  """The unit-level graph of ``spec`` on one example of ``input_shape``."""
  b = _Builder()
  x = inputs = b.new(tuple(input_shape))
  for i, op in enumerate(spec):
    kind, name = op[0], f"op{i:02d}_{op[0]}"
    if kind == "conv":
      _, features, k, s, padding = op
      x = b.conv(x, features, k, s, padding, name)
    elif kind == "dense":
      x = b.dense(x, op[1], name)
    elif kind == "pool":
      _, pool_kind, window, stride = op
      assert pool_kind in ("max", "avg")
      x = b.pool(x, window, stride)  # max and avg alike: every position connected
    elif kind == "flatten":
      x = x.reshape(-1)  # row-major (H, W, C): same units, new order
    elif kind == "gap":
      x = b.gap(x)
    elif kind == "res":
      _, features, stride = op
      y = b.conv(x, features, 3, stride, "SAME", f"{name}/conv_1")
      y = b.conv(y, features, 3, 1, "SAME", f"{name}/conv_2")
      if stride != 1 or x.shape[-1] != features:
        x = b.conv(x, features, 1, stride, "SAME", f"{name}/shortcut_conv")
      x = b.add(y, x)
    else:
      raise ValueError(f"unknown op {op!r}")
  src, dst, layer, entry = (np.concatenate(a) for a in zip(*b.edges))
  return Graph(b.n, inputs, x, src, dst, layer, entry, b.layers)


# --------------------------------------------------------------------------- search


@dataclasses.dataclass
class Result:
  masks: list  # effective masks per layer (bool, kernel shapes), graph order
  active_units: dict  # {path: active output units}
  total_units: dict
  active_inputs: int
  reach: np.ndarray
  coreach: np.ndarray


def _enabled(g: Graph, masks: Sequence[np.ndarray]) -> np.ndarray:
  """Which edges are unmasked (unlabeled edges always are)."""
  if len(masks) != len(g.layers):
    raise ValueError(f"{len(masks)} masks for {len(g.layers)} layers")
  enabled = np.ones(g.src.shape, bool)
  for li, (layer, m) in enumerate(zip(g.layers, masks)):
    m = np.asarray(m)
    assert m.shape == layer.kernel_shape and m.dtype == bool, (m.shape, m.dtype)
    sel = g.layer == li
    enabled[sel] = m.ravel()[g.entry[sel]]
  return enabled


def _fixpoint(n, seeds, src, dst):
  """Units reachable from ``seeds`` along edges src -> dst (iterative set propagation)."""
  marked = np.zeros(n, bool)
  marked[seeds] = True
  while True:
    new = marked.copy()
    new[dst[marked[src]]] = True
    if np.array_equal(new, marked):
      return marked
    marked = new


def _bfs(n, seeds, src, dst):
  """The same as :func:`_fixpoint` by breadth-first search over adjacency lists."""
  adj = collections.defaultdict(list)
  for u, v in zip(src.tolist(), dst.tolist()):
    adj[u].append(v)
  marked = np.zeros(n, bool)
  queue = collections.deque(int(u) for u in np.ravel(seeds))
  for u in queue:
    marked[u] = True
  while queue:
    u = queue.popleft()
    for v in adj[u]:
      if not marked[v]:
        marked[v] = True
        queue.append(v)
  return marked


def reference(g: Graph, masks: Sequence[np.ndarray], search: str = "fixpoint") -> Result:
  """Effective masks and active units of graph ``g`` under per-layer ``masks``."""
  enabled = _enabled(g, masks)
  src, dst = g.src[enabled], g.dst[enabled]
  walk = {"fixpoint": _fixpoint, "bfs": _bfs}[search]
  reach = walk(g.num_units, g.input_ids.ravel(), src, dst)
  coreach = walk(g.num_units, g.output_ids.ravel(), dst, src)  # reversed edges
  live = enabled & (g.layer >= 0) & reach[g.src] & coreach[g.dst]
  eff = []
  for li, layer in enumerate(g.layers):
    flat = np.zeros(int(np.prod(layer.kernel_shape)), bool)
    flat[g.entry[live & (g.layer == li)]] = True
    eff.append(flat.reshape(layer.kernel_shape))
  active = reach & coreach
  return Result(
    masks=eff,
    active_units={l.path: int(active[l.out_ids].sum()) for l in g.layers},
    total_units={l.path: int(l.out_ids.size) for l in g.layers},
    active_inputs=int(active[g.input_ids].sum()),
    reach=reach,
    coreach=coreach,
  )


# --------------------------------------------------------------------------- helpers


def mlp_reference(kernels: Sequence[np.ndarray]):
  """Effective masks of a plain MLP by boolean matrix propagation.

  Returns (effective masks, active units per layer, active inputs)."""
  ks = [np.asarray(k, bool) for k in kernels]
  reach = [np.ones(ks[0].shape[0], bool)]
  for k in ks:
    reach.append((reach[-1].astype(np.int64) @ k.astype(np.int64)) > 0)
  co = [np.ones(ks[-1].shape[1], bool)]
  for k in reversed(ks):
    co.insert(0, (k.astype(np.int64) @ co[0].astype(np.int64)) > 0)
  eff = [k & reach[i][:, None] & co[i + 1][None, :] for i, k in enumerate(ks)]
  units = [int((reach[i + 1] & co[i + 1]).sum()) for i in range(len(ks))]
  return eff, units, int((reach[0] & co[0]).sum())


def param_shapes(model: nn.Module, input_shape) -> dict:
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), np.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


# --------------------------------------------------------------------------- plain Flax nets
#
# A second spec language for networks written as Flax users write them (nn.Conv, nn.Dense,
# nn.BatchNorm, nn.LayerNorm, nn.max_pool, jax.nn activations), with their unit graphs
# built here independently of sparsejax. Ops (one example is [H, W, C] or [T, C] or [N]):
#
#   ('conv', features, (kh, kw), (sh, sw), padding, (dh, dw), groups, act)
#        padding 'SAME', 'VALID' or ((lo, hi), (lo, hi)); kernel dilation d; grouped
#        (groups = C: depthwise); act None, 'relu', 'tanh' or 'gelu'
#   ('dense', features, act)        over the last axis (per token on [T, C])
#   ('pool', kind, (wh, ww), (sh, sw), padding)   kind 'max' or 'avg'; padding as conv's
#   ('bn', zero_scale)              BatchNorm, running statistics (scale_init zeros if set)
#   ('ln',)                         LayerNorm over the last axis: connects that axis
#   ('flatten',) / ('tokens',)      [H, W, C] -> [H*W*C] / [H*W, C]
#   ('mix', tokens)                 token mixing: Dense over the token axis of [T, C]
#   ('gap',)                        mean over H, W
#   ('res', features, stride)       relu(bn(conv3(relu(bn(conv3/s(x))))) zero-init scale)
#                                   + (bn(conv1x1/s(x)) if the shape changes else x))
#   ('concat', features)            concatenate [conv3x3(x), conv1x1(x)] on channels
#
# Layer i's modules are named f"op{i}_{kind}" (unpadded: with 10+ ops the sorted key order
# is not the call order); inside 'res' / 'concat': 'conv_1', 'conv_2', 'proj' / 'a', 'b'.

_ACTS = {None: lambda x: x, "relu": nn.relu, "tanh": jnp.tanh, "gelu": nn.gelu}


class PlainRes(nn.Module):
  features: int
  stride: int

  @nn.compact
  def __call__(self, x):
    s = (self.stride, self.stride)
    y = nn.Conv(self.features, (3, 3), s, padding="SAME", use_bias=False, name="conv_1")(x)
    y = nn.relu(nn.BatchNorm(use_running_average=True, name="bn_1")(y))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv_2")(y)
    y = nn.BatchNorm(use_running_average=True, scale_init=nn.initializers.zeros, name="bn_2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), s, use_bias=False, name="proj")(x)
    return nn.relu(x + y)


class PlainNet(nn.Module):
  spec: tuple

  @nn.compact
  def __call__(self, x):
    for i, op in enumerate(self.spec):
      kind, name = op[0], f"op{i}_{op[0]}"
      if kind == "conv":
        _, f, k, s, pad, d, g, act = op
        x = _ACTS[act](
          nn.Conv(f, k, s, padding=pad, kernel_dilation=d, feature_group_count=g, name=name)(x)
        )
      elif kind == "dense":
        x = _ACTS[op[2]](nn.Dense(op[1], name=name)(x))
      elif kind == "pool":
        _, pk, w, s, pad = op
        x = (nn.max_pool if pk == "max" else nn.avg_pool)(x, w, s, padding=pad)
      elif kind == "bn":
        init = nn.initializers.zeros if op[1] else nn.initializers.ones
        x = nn.BatchNorm(use_running_average=True, scale_init=init, name=name)(x)
      elif kind == "ln":
        x = nn.LayerNorm(name=name)(x)
      elif kind == "flatten":
        x = x.reshape(x.shape[0], -1)
      elif kind == "tokens":
        x = x.reshape(x.shape[0], -1, x.shape[-1])
      elif kind == "mix":
        x = jnp.swapaxes(nn.Dense(op[1], name=name)(jnp.swapaxes(x, 1, 2)), 1, 2)
      elif kind == "gap":
        x = jnp.mean(x, axis=(1, 2))
      elif kind == "res":
        x = PlainRes(op[1], op[2], name=name)(x)
      elif kind == "concat":
        x = jnp.concatenate(
          [
            nn.Conv(op[1], (3, 3), padding="SAME", name=f"{name}_a")(x),
            nn.Conv(op[1], (1, 1), name=f"{name}_b")(x),
          ],
          axis=-1,
        )
      else:
        raise ValueError(f"unknown op {op!r}")
    return x


def _geometry(n: int, k: int, s: int, d: int, padding) -> tuple[int, int]:
  """(output size, low padding) along one axis; padding 'SAME', 'VALID' or (lo, hi)."""
  ke = (k - 1) * d + 1
  if padding == "SAME":
    out = -(-n // s)
    return out, max((out - 1) * s + ke - n, 0) // 2
  lo, hi = (0, 0) if padding == "VALID" else padding
  out = (n + lo + hi - ke) // s + 1
  if out < 1:
    raise ValueError(f"window {k} (dilation {d}) does not fit size {n} with {padding}")
  return out, lo


def _axis_pad(padding, axis):
  return padding if isinstance(padding, str) else tuple(padding[axis])


class _PlainBuilder(_Builder):
  def conv2(self, x, f, k, s, pad, d, g, path):
    H, W, C = x.shape
    oh_n, lo_h = _geometry(H, k[0], s[0], d[0], _axis_pad(pad, 0))
    ow_n, lo_w = _geometry(W, k[1], s[1], d[1], _axis_pad(pad, 1))
    cg, fg = C // g, f // g
    out = self.new((oh_n, ow_n, f))
    li = len(self.layers)
    self.layers.append(Layer(path, (k[0], k[1], cg, f), out))
    index = np.arange(k[0] * k[1] * cg * f).reshape(k[0], k[1], cg, f)
    for oh in range(oh_n):
      for ow in range(ow_n):
        for kh in range(k[0]):
          ih = oh * s[0] + kh * d[0] - lo_h
          if not 0 <= ih < H:
            continue
          for kw in range(k[1]):
            iw = ow * s[1] + kw * d[1] - lo_w
            if not 0 <= iw < W:
              continue
            for gi in range(g):
              cin = x[ih, iw, gi * cg : (gi + 1) * cg]
              cout = out[oh, ow, gi * fg : (gi + 1) * fg]
              self.add_edges(
                cin[:, None], cout[None, :], li, index[kh, kw, :, gi * fg : (gi + 1) * fg]
              )
    return out

  def dense_last(self, x, f, path):
    out = self.new(x.shape[:-1] + (f,))
    li = len(self.layers)
    self.layers.append(Layer(path, (x.shape[-1], f), out))
    index = np.arange(x.shape[-1] * f).reshape(x.shape[-1], f)
    for pos in np.ndindex(*x.shape[:-1]):
      self.add_edges(x[pos][:, None], out[pos][None, :], li, index)
    return out

  def pool2(self, x, w, s, pad):
    H, W, C = x.shape
    oh_n, lo_h = _geometry(H, w[0], s[0], 1, _axis_pad(pad, 0))
    ow_n, lo_w = _geometry(W, w[1], s[1], 1, _axis_pad(pad, 1))
    out = self.new((oh_n, ow_n, C))
    for oh in range(oh_n):
      for ow in range(ow_n):
        for dh in range(w[0]):
          for dw in range(w[1]):
            ih, iw = oh * s[0] + dh - lo_h, ow * s[1] + dw - lo_w
            if 0 <= ih < H and 0 <= iw < W:  # padding is not a unit
              self.add_edges(x[ih, iw, :], out[oh, ow, :])
    return out

  def all_to_all_last(self, x):
    """Layer norm: every unit of the last axis feeds every output unit there."""
    out = self.new(x.shape)
    for pos in np.ndindex(*x.shape[:-1]):
      self.add_edges(x[pos][:, None], out[pos][None, :])
    return out


def build_plain_graph(spec: Sequence, input_shape: Sequence[int]) -> Graph:
  """The unit-level graph of a :class:`PlainNet` spec on one example."""
  b = _PlainBuilder()
  x = inputs = b.new(tuple(input_shape))
  for i, op in enumerate(spec):
    kind, name = op[0], f"op{i}_{op[0]}"
    if kind == "conv":
      _, f, k, s, pad, d, g, _ = op
      x = b.conv2(x, f, k, s, pad, d, g, name)
    elif kind == "dense":
      x = b.dense_last(x, op[1], name)
    elif kind == "pool":
      _, _, w, s, pad = op
      x = b.pool2(x, w, s, pad)
    elif kind == "bn":
      pass  # per unit; a zero scale cuts no path
    elif kind == "ln":
      x = b.all_to_all_last(x)
    elif kind == "flatten":
      x = x.reshape(-1)
    elif kind == "tokens":
      x = x.reshape(-1, x.shape[-1])
    elif kind == "mix":
      x = b.dense_last(x.T, op[1], name).T
    elif kind == "gap":
      x = b.gap(x)
    elif kind == "res":
      _, f, st = op
      y = b.conv2(x, f, (3, 3), (st, st), "SAME", (1, 1), 1, f"{name}/conv_1")
      y = b.conv2(y, f, (3, 3), (1, 1), "SAME", (1, 1), 1, f"{name}/conv_2")
      if st != 1 or x.shape[-1] != f:
        x = b.conv2(x, f, (1, 1), (st, st), "VALID", (1, 1), 1, f"{name}/proj")
      x = b.add(y, x)
    elif kind == "concat":
      a = b.conv2(x, op[1], (3, 3), (1, 1), "SAME", (1, 1), 1, f"{name}_a")
      c = b.conv2(x, op[1], (1, 1), (1, 1), "VALID", (1, 1), 1, f"{name}_b")
      x = np.concatenate([a, c], axis=-1)
    else:
      raise ValueError(f"unknown op {op!r}")
  src, dst, layer, entry = (np.concatenate(a) for a in zip(*b.edges))
  return Graph(b.n, inputs, x, src, dst, layer, entry, b.layers)
