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
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from sparsejax.models import layers as L

# --------------------------------------------------------------------------- (a) flax module


class ResBlock(nn.Module):
    """The spec's ('res', features, stride) block (as ResNet-18's basic block)."""

    features: int
    stride: int = 1
    mode: str = L.STANDARD

    @nn.compact
    def __call__(self, x, train: bool):
        def conv(f, k, s, name):
            return L.Conv(f, (k, k), strides=(s, s), padding="SAME", use_bias=False,
                          mode=self.mode, name=name)

        y = conv(self.features, 3, self.stride, "conv_1")(x)
        y = L.Norm(mode=self.mode, name="norm_1")(y, train)
        y = L.relu(y, self.mode)
        y = conv(self.features, 3, 1, "conv_2")(y)
        y = L.Norm(mode=self.mode, name="norm_2")(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = conv(self.features, 1, self.stride, "shortcut_conv")(x)
            x = L.Norm(mode=self.mode, name="shortcut_norm")(x, train)
        return L.relu(L.add(y, x, self.mode), self.mode)


class SpecNet(nn.Module):
    """The flax network of a spec (see the module docstring)."""

    spec: tuple
    mode: str = L.STANDARD

    @nn.compact
    def __call__(self, x, train: bool = False):
        last = len(self.spec) - 1
        for i, op in enumerate(self.spec):
            kind, name = op[0], f"op{i:02d}_{op[0]}"
            if kind == "conv":
                _, features, k, s, padding = op
                x = L.Conv(features, (k, k), strides=(s, s), padding=padding, mode=self.mode,
                           name=name)(x)
                x = L.Norm(mode=self.mode, name=name + "_norm")(x, train)
                x = L.relu(x, self.mode)
            elif kind == "dense":
                x = L.Dense(op[1], mode=self.mode, name=name)(x)
                x = L.Norm(mode=self.mode, name=name + "_norm")(x, train)
                if i < last:
                    x = L.relu(x, self.mode)
            elif kind == "pool":
                _, pool_kind, window, stride = op
                x = L.pool(x, pool_kind, window, self.mode, stride=stride)
            elif kind == "flatten":
                x = L.flatten(x)
            elif kind == "gap":
                x = L.global_avg_pool(x, self.mode)
            elif kind == "res":
                x = ResBlock(op[1], op[2], mode=self.mode, name=name)(x, train)
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
    path: str                 # e.g. 'op00_conv' or 'op02_res/conv_1'
    kernel_shape: tuple
    out_ids: np.ndarray       # unit ids of the layer's output (before norm/ReLU)


@dataclasses.dataclass
class Graph:
    num_units: int
    input_ids: np.ndarray     # shaped like one input example
    output_ids: np.ndarray
    src: np.ndarray           # [E] unit ids
    dst: np.ndarray           # [E]
    layer: np.ndarray         # [E] index into `layers`, -1 for unlabeled edges (pool, add, gap)
    entry: np.ndarray         # [E] flat index into that layer's kernel (-1 if unlabeled)
    layers: list

    @property
    def paths(self) -> list[str]:
        return [l.path for l in self.layers]


class _Builder:

    def __init__(self):
        self.n = 0
        self.edges = []       # (src, dst, layer, entry) arrays
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
                        continue          # zero padding: no unit, no edge
                    for kw in range(k):
                        iw = ow * s + kw - lo_w
                        if not 0 <= iw < W:
                            continue
                        # every (cin, cout) pair of this tap at this output position
                        self.add_edges(x[ih, iw, :, None], out[oh, ow, None, :], li,
                                       kernel_index[kh, kw])
        return out

    def dense(self, x, features, path):
        if x.ndim != 1:
            raise ValueError(f"dense needs a flat input, got {x.shape}")
        out = self.new((features,))
        li = len(self.layers)
        self.layers.append(Layer(path, (x.size, features), out))
        self.add_edges(x[:, None], out[None, :], li,
                       np.arange(x.size * features).reshape(x.size, features))
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
            x = b.pool(x, window, stride)      # max and avg alike: every position connected
        elif kind == "flatten":
            x = x.reshape(-1)                  # row-major (H, W, C): same units, new order
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
    masks: list               # effective masks per layer (bool, kernel shapes), graph order
    active_units: dict        # {path: active output units}
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
    coreach = walk(g.num_units, g.output_ids.ravel(), dst, src)   # reversed edges
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
        reach=reach, coreach=coreach)


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
