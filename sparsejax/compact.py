"""Compaction: dead units removed, a smaller dense network computing the same function.

A unit (a neuron, or a conv channel at every position) is classified from the exact
unit-level reachability of the masked network (:func:`sparsejax.effective.channel_reach`,
method.md section 1), per channel c of a *channel space* (the outputs of one layer, or a
residual stream with every layer that writes it):

    coreach(c) = OR over writers and positions of coreach(u)
    reach(c)   = OR over writers and positions of reach(u)

- not coreach(c): c influences no output; it is dropped (with its kernel columns, bias,
  batch-norm parameters and statistics, and the readers' input slices).
- coreach(c) and reach(c): c is live; it is kept.
- coreach(c), not reach(c): c is a constant (its bias and normalization, in inference
  mode). It is dropped when it is exactly 0 where every reader reads it (zero padding
  then makes no difference), folded into the readers' biases when every reader has a
  bias and sees it as a position-independent shift (Dense layers; convolutions only when
  the contribution is the same at every output position, e.g. 'VALID' ones), and kept
  otherwise: exactness beats size.

Residual-coupled channels form one space, so they are removed only together. A space
never shrinks below one channel (a kept dead channel changes nothing). The input and
the logits are never compacted.

Equality. The compacted network computes the masked network's function in inference
mode (``train=False``), up to float rounding (summation order of smaller kernels,
folded biases); ``verify=True`` checks max |logit difference| <= 1e-5 x max |logit|.

Training equivalence. A masked training run of the compacted network (same data, same
optimizer, the sliced masks) follows the original's run when every removed unit has no
effect on the loss at any step: dropped non-co-reachable units never do (their
gradients are 0; per-weight optimizers such as SGD with momentum and decoupled weight
decay never couple them to the rest; a global-norm clip would not see them either,
their gradients being 0); a constant that is exactly 0 stays 0 in training mode, since
z = 0 gives bn(z) = beta and relu'(0) = 0 stops every gradient into it (true at
initialization: biases and batch-norm shifts start at 0). A *folded* nonzero constant
is not training-equivalent (in training mode batch norm maps it to relu(beta), and beta
learns); use ``fold=False`` to keep such units when the compacted network is to be
trained. Batch statistics in training mode mix the positions of one channel, which the
inference-mode reachability does not: a dropped channel that feeds (unmasked) units of
a channel that is co-reachable at other positions only would shift that channel's batch
mean. With full-size kernels this needs border effects of padding and is not seen on
the zoo (the tests train compacted LeNet-300-100 and VGG and compare the loss curves);
Dense networks (one position) are exact. The removed parameters are sliced away, never
re-initialized: train the returned variables, not ``model.init`` of the compacted
model (the sliced batch-norm statistics of kept channels are the original ones).

Models: the zoo (LeNet-300-100, LeNet-5, VGG, ResNet-18); their widths are fields
(``hidden``, ``channels``, ``config``, ``widths``/``inner``), so a compacted network is
an ordinary instance. Any other model: ValueError (compaction needs the channel spaces,
i.e. which parameters a unit owns and which kernels read it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sparsejax import effective, models, tracing
from sparsejax import masks as masks_lib
from sparsejax.errors import CompactionMismatchError
from sparsejax.models.lenet import LeNet5, LeNet300100
from sparsejax.models.resnet import ResNet18
from sparsejax.models.vgg import VGG

#: Relative tolerance of ``verify``: max |logit difference| <= RTOL * max |logit|.
RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Space:
  """Channels shared by some layers.

  writers: module paths whose every variable's last axis is the space (kernel outputs,
    biases, batch-norm parameters and statistics); sites: the linear ops among them
    (their outputs carry the reach/coreach maps); readers: linear ops whose kernel's
    input axis is the space (a Dense kernel after a flatten reads [positions * C]).
  """

  name: str
  size: int
  writers: tuple
  sites: tuple
  readers: tuple


@dataclasses.dataclass(frozen=True)
class Plan:
  """What compaction keeps per space: kept and folded channel indices, and the counts."""

  kept: dict  # space name -> np.ndarray of kept channel indices
  folded: dict  # space name -> np.ndarray of folded channel indices
  dropped: dict  # space name -> np.ndarray of dropped channel indices
  sizes: dict  # space name -> original size
  shifts: dict  # reader module path -> bias shift [out] from the folded constants

  def live_fraction(self) -> float:
    """Kept channels / channels over all spaces."""
    return sum(len(v) for v in self.kept.values()) / sum(self.sizes.values())


# ------------------------------------------------------------------------ the zoo


def _layer_space(name, size, writer, norm, readers):
  return Space(name, size, (writer, norm), (writer,), tuple(readers))


def _lenet300100(model: LeNet300100):
  h = tuple(model.hidden)
  spaces = [
    _layer_space(f"dense_{i}", w, f"dense_{i}", f"norm_{i}", [f"dense_{i + 1}"])
    for i, w in enumerate(h)
  ]
  return spaces, lambda s: model.clone(hidden=tuple(s))


def _lenet5(model: LeNet5):
  c, h = tuple(model.channels), tuple(model.hidden)
  spaces = [
    _layer_space(
      f"conv_{i}",
      w,
      f"conv_{i}",
      f"norm_{i}",
      [f"conv_{i + 1}" if i + 1 < len(c) else f"dense_{len(c)}"],
    )
    for i, w in enumerate(c)
  ]
  n = len(c)
  spaces += [
    _layer_space(f"dense_{n + j}", w, f"dense_{n + j}", f"norm_{n + j}", [f"dense_{n + j + 1}"])
    for j, w in enumerate(h)
  ]
  return spaces, lambda s: model.clone(channels=tuple(s[:n]), hidden=tuple(s[n:]))


def _vgg(model: VGG):
  widths = [w for w in model.config if w != "M"]
  spaces = [
    _layer_space(
      f"conv_{i:02d}",
      w,
      f"conv_{i:02d}",
      f"norm_{i:02d}",
      [f"conv_{i + 1:02d}" if i + 1 < len(widths) else "dense"],
    )
    for i, w in enumerate(widths)
  ]

  def rebuild(sizes):
    it = iter(sizes)
    return model.clone(config=tuple("M" if w == "M" else next(it) for w in model.config))

  return spaces, rebuild


def _resnet18(model: ResNet18):
  widths = tuple(model.widths)
  inner = (
    tuple(model.inner) if model.inner is not None else tuple(w for w in widths for _ in range(2))
  )
  spaces = []
  for s, w in enumerate(widths, start=1):
    writers, sites = [], []
    if s == 1:
      writers += ["stage0_conv", "stage0_norm"]
      sites += ["stage0_conv"]
    else:
      writers += [f"stage{s}_block0/shortcut_conv", f"stage{s}_block0/shortcut_norm"]
      sites += [f"stage{s}_block0/shortcut_conv"]
    for b in range(2):
      writers += [f"stage{s}_block{b}/conv_2", f"stage{s}_block{b}/norm_2"]
      sites += [f"stage{s}_block{b}/conv_2"]
    readers = (["stage1_block0/conv_1"] if s == 1 else []) + [f"stage{s}_block1/conv_1"]
    readers += (
      [f"stage{s + 1}_block0/conv_1", f"stage{s + 1}_block0/shortcut_conv"]
      if s < len(widths)
      else ["stage5_dense"]
    )
    spaces.append(Space(f"stream{s}", w, tuple(writers), tuple(sites), tuple(readers)))
  for k, w in enumerate(inner):
    blk = f"stage{k // 2 + 1}_block{k % 2}"
    spaces.append(
      _layer_space(f"{blk}/inner", w, f"{blk}/conv_1", f"{blk}/norm_1", [f"{blk}/conv_2"])
    )
  n = len(widths)
  return spaces, lambda s: model.clone(widths=tuple(s[:n]), inner=tuple(s[n:]))


#: Model class -> (model -> (spaces, rebuild(new sizes) -> model)).
FAMILIES: dict[type, Callable] = {
  LeNet300100: _lenet300100,
  LeNet5: _lenet5,
  VGG: _vgg,
  ResNet18: _resnet18,
}

#: One example's default input shape per family (the paper's datasets).
_DEFAULT_INPUT = {
  LeNet300100: (28, 28, 1),
  LeNet5: (32, 32, 3),
  VGG: (32, 32, 3),
  ResNet18: (64, 64, 3),
}


def default_input(model) -> tuple[int, ...]:
  """One example's shape a zoo network is traced on when no input is given (its paper
  dataset's); ValueError for other models."""
  channel_spaces(model)  # ValueError naming the known networks
  return _DEFAULT_INPUT[type(model)]


def channel_spaces(model) -> tuple[list[Space], Callable]:
  """The channel spaces of a zoo model and ``rebuild(sizes) -> model``; ValueError for
  other models."""
  family = FAMILIES.get(type(model))
  if family is None:
    known = ", ".join(c.__name__ for c in FAMILIES)
    raise ValueError(
      f"model={type(model).__name__} is not a network the compactor knows (allowed: "
      f"{known}); compaction needs to know which parameters each unit owns and which "
      "kernels read it (its channel spaces) and how to rebuild the model with fewer "
      "units."
    )
  return family(model)


# ------------------------------------------------------------------------ capture


def _capture_inputs(model, variables, x) -> dict:
  """{module path: (input, linear)} of every Dense/Conv call in inference mode, where
  ``linear(z)`` is the module's op on z without its bias (same kernel)."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Dense, nn.Conv)):
      op = mod.clone(parent=None, use_bias=False)
      k = {"params": {"kernel": mod.variables["params"]["kernel"]}}
      seen["/".join(mod.scope.path)] = (args[0], lambda z, op=op, k=k: op.apply(k, z))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)
  return seen


# ------------------------------------------------------------------------ plan


def _check_variables(variables):
  if not hasattr(variables, "keys") or "params" not in variables:
    raise ValueError(
      "variables has no 'params' collection; pass the model's variables (e.g. model.init(...))."
    )


def _channels(x: np.ndarray, size: int) -> np.ndarray:
  """[1, ..., positions * C] or [1, ..., C] -> [positions, C]."""
  return np.asarray(x).reshape(-1, size)


def _model_and_input(model, input_shape):
  """(Flax module, input shape): ``model`` may be a :class:`sparsejax.Traced` (which
  carries its input); without an input, the family's default."""
  if isinstance(model, tracing.Traced):
    if input_shape is not None:
      raise ValueError("input_shape: model is a sparsejax.Traced, which carries its input.")
    return model.model, model.input
  channel_spaces(model)  # ValueError for networks the compactor does not know
  return model, _DEFAULT_INPUT[type(model)] if input_shape is None else input_shape


def plan(model, variables, masks, *, input_shape=None, fold: bool = True) -> Plan:
  """Which channels compaction keeps, folds and drops (see the module docstring)."""
  model, input_shape = _model_and_input(model, input_shape)
  spaces, _ = channel_spaces(model)
  _check_variables(variables)
  reach = effective.channel_reach(model, masks, input_shape, variables=variables)
  masked = {**variables, "params": masks_lib.apply(variables["params"], masks)}
  x = jnp.zeros(tracing.example_input(input_shape).shape, jnp.float32)
  inputs = _capture_inputs(model, masked, x)
  flat = traverse_util.flatten_dict(masked["params"], sep="/")
  keep, cand = {}, {}
  for sp in spaces:
    r = np.zeros(sp.size, bool)
    c = np.zeros(sp.size, bool)
    for site in sp.sites:
      rs, cs = reach[site]
      r |= rs
      c |= cs
    zero = np.ones(sp.size, bool)
    for rd in sp.readers:
      zero &= (_channels(inputs[rd][0], sp.size) == 0).all(0)
    keep[sp.name], cand[sp.name] = c & r, c & ~r & ~zero
  # the constants' shifts of the readers' outputs (without bias)
  deltas = {
    rd: inputs[rd][1](_zero_channels(inputs[rd][0], np.flatnonzero(cand[sp.name]), sp.size))
    for sp in spaces
    if fold and cand[sp.name].any()
    for rd in sp.readers
    if f"{rd}/bias" in flat
  }
  kept, folded, dropped, sizes, shifts = {}, {}, {}, {}, {}
  for sp in spaces:
    k, f = keep[sp.name], cand[sp.name]
    if f.any():  # fold when every reader has a bias and sees a uniform shift
      ds = [deltas.get(rd) for rd in sp.readers]
      ds = [None if d is None else np.asarray(d).reshape(-1, d.shape[-1]) for d in ds]
      uniform = all(
        d is not None and np.all(np.abs(d - d[0]) <= 1e-6 * np.max(np.abs(d)) + 1e-30) for d in ds
      )
      if uniform:
        shifts.update({rd: d[0] for rd, d in zip(sp.readers, ds)})
      else:
        k, f = k | f, np.zeros_like(f)
    if not k.any():  # never empty: keep a dropped channel (it changes nothing)...
      if f.all():  # ...or, with none dropped, fold nothing
        k, f = f, np.zeros_like(f)
        for rd in sp.readers:
          shifts.pop(rd, None)
      else:
        k = k.copy()
        k[np.flatnonzero(~f)[0]] = True
    kept[sp.name] = np.flatnonzero(k)
    folded[sp.name] = np.flatnonzero(f)
    dropped[sp.name] = np.flatnonzero(~k & ~f)
    sizes[sp.name] = sp.size
  return Plan(kept, folded, dropped, sizes, shifts)


# ------------------------------------------------------------------------ compact


def _slice_last(a, idx):
  return None if a is None else jnp.take(jnp.asarray(a), jnp.asarray(idx), axis=-1)


def _slice_input(a, idx, size):
  """Kernel [..., in, out] whose input axis is positions * size (or size) -> sliced."""
  if a is None:
    return None
  a = jnp.asarray(a)
  lead, out = a.shape[:-2], a.shape[-1]
  b = a.reshape(-1, size, out)[:, jnp.asarray(idx), :]
  n_in = a.shape[-2] // size * len(idx)
  return b.reshape(*lead, n_in, out) if lead else b.reshape(n_in, out)


def _zero_channels(x, keep_idx, size):
  """x [1, ..., positions * size] with every channel outside keep_idx zeroed."""
  sel = np.zeros(size, np.float32)
  sel[keep_idx] = 1.0
  return (x.reshape(1, -1, size) * sel).reshape(x.shape)


def compact(
  model,
  variables,
  masks,
  *,
  input_shape=None,
  fold: bool = True,
  verify: bool = False,
  key: jax.Array | None = None,
):
  """The masked network with its dead units removed: ``(model, variables, masks)``.

  Args:
    model: a zoo network (LeNet300100, LeNet5, VGG, ResNet18), any widths, or its
      :class:`sparsejax.Traced` (which carries the input).
    variables: its variables ({'params': ..., 'batch_stats': ...}).
    masks: bool masks shaped like params (None elsewhere); masked weights are zeroed.
    input_shape: one example's shape without the batch axis (default: the family's
      paper input, e.g. (32, 32, 3) for VGG).
    fold: fold nonzero constant units into the readers' biases where exact (inference
      equality; not training-equivalent, see the module docstring).
    verify: check that the logits agree (inference mode, a batch of 8 standard normal
      inputs from ``key``) and raise :class:`CompactionMismatchError` otherwise.

  Returns:
    (compacted model, its variables (masked weights zero), its masks (the original masks
    sliced; a kept unmasked weight stays unmasked, active or not)).
  """
  model, input_shape = _model_and_input(model, input_shape)
  spaces, rebuild = channel_spaces(model)
  p = plan(model, variables, masks, input_shape=input_shape, fold=fold)
  masked = {**variables, "params": masks_lib.apply(variables["params"], masks)}
  flat = {k: traverse_util.flatten_dict(v, sep="/") for k, v in masked.items()}
  fmask = traverse_util.flatten_dict(masks, sep="/")
  for rd, d in p.shifts.items():  # folded constants -> the readers' biases
    flat["params"][f"{rd}/bias"] = flat["params"][f"{rd}/bias"] + jnp.asarray(d)
  # slice
  for sp in spaces:
    idx = p.kept[sp.name]
    if len(idx) == sp.size:
      continue
    for col in flat:
      for k in list(flat[col]):
        if any(k.startswith(w + "/") for w in sp.writers):
          flat[col][k] = _slice_last(flat[col][k], idx)
          if col == "params" and k in fmask:
            fmask[k] = _slice_last(fmask[k], idx)
    for rd in sp.readers:
      k = f"{rd}/kernel"
      flat["params"][k] = _slice_input(flat["params"][k], idx, sp.size)
      fmask[k] = _slice_input(fmask[k], idx, sp.size)
  new_model = rebuild([len(p.kept[sp.name]) for sp in spaces])
  new_vars = {c: traverse_util.unflatten_dict(v, sep="/") for c, v in flat.items()}
  new_masks = traverse_util.unflatten_dict(fmask, sep="/")
  if verify:
    check_equal(model, variables, masks, new_model, new_vars, input_shape, key=key)
  return new_model, new_vars, new_masks


def logits_gap(
  model,
  variables,
  masks,
  new_model,
  new_variables,
  input_shape,
  *,
  key: jax.Array | None = None,
  batch: int = 8,
  x=None,
) -> tuple[float, float]:
  """(max |logit difference|, max |logit|) between the masked original and a compacted
  network in inference mode, on ``x`` or a standard normal batch from ``key``."""
  if x is None:
    key = jax.random.key(0) if key is None else key
    shape = (batch,) + models.check_input_shape(input_shape)
    x = jax.random.normal(key, shape, jnp.float32)
  masked = {**variables, "params": masks_lib.apply(variables["params"], masks)}
  ref = model.apply(masked, x, train=False)
  out = new_model.apply(new_variables, x, train=False)
  return float(jnp.max(jnp.abs(ref - out))), float(jnp.max(jnp.abs(ref)))


def check_equal(
  model,
  variables,
  masks,
  new_model,
  new_variables,
  input_shape,
  *,
  key: jax.Array | None = None,
  x=None,
) -> float:
  """Raises :class:`CompactionMismatchError` unless max |logit difference| <= RTOL x
  max |logit|; returns the relative difference."""
  diff, scale = logits_gap(
    model, variables, masks, new_model, new_variables, input_shape, key=key, x=x
  )
  rel = diff / scale if scale > 0 else diff
  if not rel <= RTOL:
    raise CompactionMismatchError(
      f"the compacted {type(new_model).__name__} differs from the masked original: max "
      f"|logit difference| {diff:.3g} at logit scale {scale:.3g} (allowed: {RTOL:g} x "
      "scale).",
      max_diff=diff,
      scale=scale,
    )
  return rel


__all__ = [
  "compact",
  "plan",
  "Plan",
  "Space",
  "channel_spaces",
  "check_equal",
  "logits_gap",
  "CompactionMismatchError",
  "FAMILIES",
  "RTOL",
]
