"""Activation (ephemeral) sparsity: top-k or thresholded activations, as a program transform.

Model pruning removes weights for good; *ephemeral* pruning sparsifies only what one input
computes. :func:`sparsify` takes any JAX function ``fn(variables, x, ...)`` (a Flax module's
``apply``) and returns one with the same signature whose chosen activations are
sparsified: ``fn`` is traced to its program (jaxpr) at the call's shapes and re-evaluated
equation by equation, an :class:`Op` applied where a :class:`Rule` matches. Nothing in the
model changes: no special layers, the same variables, jit-able and differentiable, in
training (``train=True, mutable=[...]``) and inference alike. :class:`Sparsified` wraps a
Flax module the same way so that :func:`sparsejax.training.train` trains it.

Ops, on an activation ``a`` whose first axis is the batch:

- :class:`TopK`: keep the k entries of largest |a| per example (over all axes but the
  first) or per token (over the last axis: each position of a sequence or an image
  separately), zero the rest. Exactly k entries are kept, ties broken by position (the
  lower flat index first), so an activation with fewer than k nonzeros keeps all of them.
- :class:`Threshold`: keep the entries with |a| > threshold.

Where (:class:`Rule`; all three narrow by Flax module path, the '/'-joined module names of
the equation's name stack below the model, e.g. ``dense_1`` or ``layers/mlp``, as globs):

- ``primitive=``: after every equation of that primitive or function name, e.g. 'relu'
  (``nn.relu`` is a function of that name), 'tanh', 'max', 'logistic';
- ``module=`` alone: the outputs of the matching modules (what their callers read);
- ``before=``: the input-dependent operand of the linear ops (Dense, Conv, einsum) of the
  matching modules: the activation a layer reads, whatever computed it (e.g. a GELU that
  is not a function of its own).

Only input-dependent values are sparsified (a parameter-only ``max`` is left alone).

Gradient (``gradient=``):

- 'straight_through' (default): the forward pass computes m * a with m the op's mask;
  the backward pass is the identity, da = dy (``a + stop_gradient(m * a - a)``): every
  entry learns as if it had been kept, as the straight-through estimator of weight masks
  (:func:`sparsejax.optim.straight_through`) does;
- 'sparse': the gradient of m * a with m held constant, da = m * dy: the dropped
  entries get no gradient (the exact gradient almost everywhere, as k-winners-take-all
  trains).

The mask itself is never differentiated. Calls inside a transformed region are inlined
(``jit``, ``custom_jvp``/``custom_vjp`` functions containing a match lose their custom
rule; a matched ``nn.relu`` keeps its own); ``scan``, ``while`` and ``cond`` bodies
containing a match are rebuilt and bound again, so ``nn.scan`` layer stacks work.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from sparsejax import ephemeral, models
  >>> model = models.create("lenet300100")
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  >>> sparse = ephemeral.Sparsified(model, (ephemeral.Rule(ephemeral.TopK(k=30),
  ...                                                      before="dense_1"),))
  >>> sparse.apply(variables, jnp.ones((2, 28, 28, 1))).shape
  (2, 10)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax import _jax_compat

PER = ("example", "token")
GRADIENTS = ("straight_through", "sparse")
#: Linear ops whose input-dependent operand ``before=`` sparsifies.
LINEAR = frozenset({"dot_general", "conv_general_dilated"})
#: Calls whose body is inlined when a rule matches inside them.
_INLINED = frozenset(
  {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
  }
)
#: Loops and branches whose bodies are rebuilt (params holding jaxprs).
_REBUILT = {"scan": ("jaxpr",), "while": ("cond_jaxpr", "body_jaxpr"), "cond": ("branches",)}


# --------------------------------------------------------------------------- ops


def _check_gradient(gradient: str) -> str:
  if gradient not in GRADIENTS:
    raise ValueError(f"gradient={gradient!r} is not allowed; allowed: {', '.join(GRADIENTS)}.")
  return gradient


def _keep(a: jax.Array, mask: jax.Array, gradient: str) -> jax.Array:
  """m * a forward; identity ('straight_through') or m * dy ('sparse') backward."""
  kept = jnp.where(mask, a, jnp.zeros_like(a))
  if gradient == "sparse":
    return kept
  return a + lax.stop_gradient(kept - a)


def top_k_mask(a: jax.Array, k: int, per: str = "example") -> jax.Array:
  """Bool mask of the ``k`` entries of largest |a| per example (all axes but the first
  together) or per token (along the last axis), exactly k of them (clipped to the size),
  ties by position, lower index first. Shape of ``a``; jit-able (static k).

  The k-th largest value t comes from ``lax.top_k``; the kept entries are those above t
  and the first (k - #above) equal to t, counted by a cumulative sum: no scatter."""
  if per not in PER:
    raise ValueError(f"per={per!r} is not allowed; allowed: {', '.join(PER)}.")
  if a.ndim < (2 if per == "example" else 1):
    raise ValueError(
      f"an activation of shape {a.shape} has no axis to take the top k over per {per} "
      "(the first axis is the batch)."
    )
  x = jnp.abs(lax.stop_gradient(a))
  flat = x.reshape(x.shape[0], -1) if per == "example" else x
  n = flat.shape[-1]
  k = int(min(max(k, 0), n))
  if k == 0:
    return jnp.zeros(a.shape, bool)
  if k == n:
    return jnp.ones(a.shape, bool)
  t = lax.top_k(flat, k)[0][..., k - 1 :]
  above = flat > t
  tie = flat == t
  room = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  keep = above | (tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= room))
  return keep.reshape(a.shape)


@dataclasses.dataclass(frozen=True)
class TopK:
  """Keep the ``k`` entries of largest |a| (or ``fraction`` of them, rounded up) per
  example or per token (``per``), zero the rest; exactly k kept, ties by position."""

  k: int | None = None
  fraction: float | None = None
  per: str = "example"

  def __post_init__(self):
    if (self.k is None) == (self.fraction is None):
      raise ValueError(
        f"TopK needs exactly one of k and fraction; got k={self.k!r}, fraction={self.fraction!r}."
      )
    if self.k is not None and (
      isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1
    ):
      raise ValueError(f"k={self.k!r} must be a positive integer (entries kept).")
    if self.fraction is not None and not (
      isinstance(self.fraction, (int, float)) and 0.0 < self.fraction <= 1.0
    ):
      raise ValueError(f"fraction={self.fraction!r} must be in (0, 1] (entries kept).")
    if self.per not in PER:
      raise ValueError(f"per={self.per!r} is not allowed; allowed: {', '.join(PER)}.")

  def kept(self, a_shape: Sequence[int]) -> int:
    """Entries kept per example (or per token) of an activation of shape ``a_shape``."""
    n = int(np.prod(a_shape[1:])) if self.per == "example" else int(a_shape[-1])
    if self.k is not None:
      return min(self.k, n)
    return min(n, int(np.ceil(self.fraction * n - 1e-9)))

  def mask(self, a: jax.Array) -> jax.Array:
    return top_k_mask(a, self.kept(a.shape), self.per)


@dataclasses.dataclass(frozen=True)
class Threshold:
  """Keep the entries with |a| > ``threshold`` (>= 0), zero the rest."""

  threshold: float

  def __post_init__(self):
    t = self.threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
      raise ValueError(f"threshold={t!r} must be a non-negative number.")

  def mask(self, a: jax.Array) -> jax.Array:
    return jnp.abs(lax.stop_gradient(a)) > self.threshold


Op = TopK | Threshold


@dataclasses.dataclass(frozen=True)
class Rule:
  """Where an :class:`Op` applies (the module docstring): after every equation named
  ``primitive`` (one name or a tuple), at the outputs of the modules matching ``module``,
  or before the linear ops of the modules matching ``before``; ``primitive`` and
  ``before`` are narrowed to ``module`` when given with it. Module paths are globs
  (``fnmatch``) on the '/'-joined Flax module names below the model."""

  op: Op
  primitive: str | tuple[str, ...] | None = None
  module: str | None = None
  before: str | None = None

  def __post_init__(self):
    if not isinstance(self.op, (TopK, Threshold)):
      raise ValueError(f"op={self.op!r} must be an ephemeral.TopK or ephemeral.Threshold.")
    if self.primitive is not None and self.before is not None:
      raise ValueError("give primitive= or before=, not both (before= reads a linear op's input).")
    if self.primitive is None and self.module is None and self.before is None:
      raise ValueError("a Rule needs primitive=, module= or before= (where to sparsify).")
    names = (self.primitive,) if isinstance(self.primitive, str) else self.primitive
    if names is not None and not (names and all(isinstance(p, str) and p for p in names)):
      raise ValueError(f"primitive={self.primitive!r} must be a name or a tuple of names.")
    for field in ("module", "before"):
      value = getattr(self, field)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{field}={value!r} must be a non-empty module path (glob).")

  @property
  def names(self) -> tuple[str, ...]:
    if self.primitive is None:
      return ()
    return (self.primitive,) if isinstance(self.primitive, str) else tuple(self.primitive)


def check_rules(rules) -> tuple[Rule, ...]:
  """``rules`` (one Rule or a sequence of them) as a tuple, or ValueError."""
  if isinstance(rules, Rule):
    return (rules,)
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence) or not rules:
    raise ValueError(f"rules={rules!r} must be an ephemeral.Rule or a non-empty sequence of them.")
  for r in rules:
    if not isinstance(r, Rule):
      raise ValueError(f"rules holds {r!r}, which is not an ephemeral.Rule.")
  return tuple(rules)


# --------------------------------------------------------------------------- matching


def _within(path: str, pattern: str) -> str | None:
  """The shortest prefix of ``path`` (a module path) matching the glob ``pattern``."""
  if not path:
    return None
  parts = path.split("/")
  for i in range(1, len(parts) + 1):
    prefix = "/".join(parts[:i])
    if fnmatch.fnmatchcase(prefix, pattern):
      return prefix
  return None


def _inside(path: str, module: str) -> bool:
  return path == module or path.startswith(module + "/")


def _eqn_names(eqn) -> set[str]:
  """The primitive's name and, for a call, the called function's (``nn.relu`` is a
  ``custom_jvp_call`` of one ``jit`` named 'relu')."""
  names = {eqn.primitive.name}
  p = eqn.params
  if "name" in p and isinstance(p["name"], str):
    names.add(p["name"])
  inner = p.get("call_jaxpr", p.get("fun_jaxpr"))
  if inner is not None:
    inner = getattr(inner, "jaxpr", inner)
    if len(inner.eqns) == 1 and isinstance(inner.eqns[0].params.get("name"), str):
      names.add(inner.eqns[0].params["name"])
  return names


def _join(scope: str, stack) -> str:
  stack = str(stack or "")
  return f"{scope}/{stack}" if scope and stack else (scope or stack)


def _sub_jaxprs(eqn) -> list:
  out = []
  for v in eqn.params.values():
    for j in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(j, (_jax_compat.ClosedJaxpr, _jax_compat.Jaxpr)):
        out.append(getattr(j, "jaxpr", j))
  return out


@dataclasses.dataclass
class _Context:
  rules: tuple
  gradient: str
  root: bool  # strip the first name-stack component (a Flax model's class name)
  sites: list  # (rule index, kind, path, shape) of every application, in order

  def path(self, scope: str | None, eqn) -> str:
    """The module path of ``eqn`` in a jaxpr called at ``scope`` (None: the top level,
    whose name stacks start with the model's class name when ``root``)."""
    stack = str(eqn.source_info.name_stack or "")
    if scope is None:
      if self.root:
        stack = stack.split("/", 1)[1] if "/" in stack else ""
      return stack
    return _join(scope, stack)

  def after(self, eqn, path: str) -> list[int]:
    """Rules that sparsify the outputs of ``eqn`` (by name)."""
    names = _eqn_names(eqn)
    return [
      i
      for i, r in enumerate(self.rules)
      if r.names
      and names & set(r.names)
      and (r.module is None or _within(path, r.module) is not None)
    ]

  def before(self, eqn, path: str) -> list[int]:
    if eqn.primitive.name not in LINEAR:
      return []
    return [
      i
      for i, r in enumerate(self.rules)
      if r.before is not None
      and _within(path, r.before) is not None
      and (r.module is None or _within(path, r.module) is not None)
    ]

  def outputs_of(self, path: str) -> list[tuple[int, str]]:
    """(rule, module) pairs whose module's outputs include values made at ``path``."""
    out = []
    for i, r in enumerate(self.rules):
      if r.module is not None and not r.names and r.before is None:
        m = _within(path, r.module)
        if m is not None:
          out.append((i, m))
    return out

  def matches_inside(self, jaxpr, scope: str) -> bool:
    """Whether any rule could apply inside ``jaxpr`` (at ``scope``)."""
    for eqn in jaxpr.eqns:
      path = self.path(scope, eqn)
      if self.after(eqn, path) or self.before(eqn, path) or self.outputs_of(path):
        return True
      if any(self.matches_inside(j, path) for j in _sub_jaxprs(eqn)):
        return True
    return False

  def apply(self, i: int, kind: str, path: str, a):
    if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating) or a.ndim < 1:
      return a
    rule = self.rules[i]
    self.sites.append((i, kind, path, tuple(a.shape)))
    return _keep(a, rule.op.mask(a), self.gradient)


# --------------------------------------------------------------------------- interpreter


def _evaluate(ctx: _Context, jaxpr, consts, args, scope: str | None, dep_in: Sequence[bool]):
  """Evaluates ``jaxpr`` on ``args`` with the rules applied; ``dep_in``: which args
  depend on the input. Returns (outputs, their input dependence)."""
  env, dep, made_in = {}, {}, {}

  def read(v):
    if isinstance(v, _jax_compat.Literal):
      return v.val
    return env[v]

  def depends(v) -> bool:
    return not isinstance(v, _jax_compat.Literal) and dep.get(v, False)

  for v, c in zip(jaxpr.constvars, consts):
    env[v], dep[v] = c, False
  for v, a, d in zip(jaxpr.invars, args, dep_in):
    env[v], dep[v] = a, bool(d)

  def read_at(v, path: str):
    """``v`` as the equation at ``path`` reads it: a module output leaving its module is
    sparsified on the way out."""
    x = read(v)
    if isinstance(v, _jax_compat.Literal) or not depends(v):
      return x
    for i, m in made_in.get(v, ()):
      if not _inside(path, m):
        x = ctx.apply(i, "module", m, x)
    return x

  for eqn in jaxpr.eqns:
    path = ctx.path(scope, eqn)
    ins = [read_at(v, path) for v in eqn.invars]
    in_dep = [depends(v) for v in eqn.invars]
    before = ctx.before(eqn, path)
    if before and sum(in_dep[:2]) == 1:
      j = 0 if in_dep[0] else 1
      for i in before:
        ins[j] = ctx.apply(i, "before", path, ins[j])
    after = ctx.after(eqn, path)
    name = eqn.primitive.name
    subs = _sub_jaxprs(eqn)
    inner = [] if after else [j for j in subs if ctx.matches_inside(j, path)]
    if inner and name in _INLINED:
      outs, out_dep = _inline(ctx, eqn, ins, in_dep, path)
    elif inner and name in _REBUILT:
      outs, out_dep = _rebuild(ctx, eqn, ins, in_dep, path)
    else:
      subfuns, params = _jax_compat.bind_params(eqn.primitive, eqn.params)
      outs = eqn.primitive.bind(*subfuns, *ins, **params)
      outs = list(outs) if eqn.primitive.multiple_results else [outs]
      out_dep = [any(in_dep)] * len(outs)
    if after and any(in_dep):
      for i in after:
        outs = [ctx.apply(i, "after", path, o) for o in outs]
    owners = ctx.outputs_of(path)
    for v, o, d in zip(eqn.outvars, outs, out_dep):
      env[v], dep[v] = o, d
      if owners and d:
        made_in[v] = owners
  # Outputs of a module leave it here when this jaxpr's caller is outside the module.
  outs = [read_at(v, scope or "") for v in jaxpr.outvars]
  return outs, [depends(v) for v in jaxpr.outvars]


def _closed(j):
  return (j.jaxpr, j.consts) if isinstance(j, _jax_compat.ClosedJaxpr) else (j, [])


def _inline(ctx: _Context, eqn, ins, in_dep, path: str):
  p = eqn.params
  inner = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
  jaxpr, consts = _closed(inner)
  return _evaluate(ctx, jaxpr, consts, ins, path, in_dep)


def _transformed(ctx: _Context, closed, path: str, dep_in) -> _jax_compat.ClosedJaxpr:
  """``closed`` with the rules applied inside, as a closed jaxpr of the same signature."""
  jaxpr, consts = _closed(closed)
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in jaxpr.invars]
  fn = lambda *args: _evaluate(ctx, jaxpr, consts, args, path, dep_in)[0]
  return jax.make_jaxpr(fn)(*avals)


def _dependence(jaxpr, dep_in: Sequence[bool]) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on the inputs marked in ``dep_in`` (an output of
  an equation depends on the input when any operand does)."""
  dep = {v: bool(d) for v, d in zip(jaxpr.invars, dep_in)}
  get = lambda v: not isinstance(v, _jax_compat.Literal) and dep.get(v, False)
  for eqn in jaxpr.eqns:
    d = any(get(v) for v in eqn.invars)
    for v in eqn.outvars:
      dep[v] = d
  return [get(v) for v in jaxpr.outvars]


def _carried(body, before: list, carry: list, after: list) -> list[bool]:
  """The input dependence of a loop's carry: its initial value's, grown until the body
  keeps it (a fixed point)."""
  carry = list(carry)
  jaxpr = _closed(body)[0]
  while True:
    out = _dependence(jaxpr, before + carry + after)[: len(carry)]
    grown = [c or o for c, o in zip(carry, out)]
    if grown == carry:
      return carry
    carry = grown


def _rebuild(ctx: _Context, eqn, ins, in_dep, path: str):
  """A scan, while or cond whose bodies contain a match, bound again with transformed
  bodies (the same signature)."""
  name, p = eqn.primitive.name, dict(eqn.params)
  in_dep = list(in_dep)
  if name == "scan":
    nc, nk = p["num_consts"], p["num_carry"]
    consts, xs = in_dep[:nc], in_dep[nc + nk :]
    carry = _carried(p["jaxpr"], consts, in_dep[nc : nc + nk], xs)
    dep_body = consts + carry + xs
    p["jaxpr"] = _transformed(ctx, p["jaxpr"], path, dep_body)
    out_dep = _dependence(_closed(p["jaxpr"])[0], dep_body)
  elif name == "while":
    cc, bc = p["cond_nconsts"], p["body_nconsts"]
    body_consts = in_dep[cc : cc + bc]
    carry = _carried(p["body_jaxpr"], body_consts, in_dep[cc + bc :], [])
    p["cond_jaxpr"] = _transformed(ctx, p["cond_jaxpr"], path, in_dep[:cc] + carry)
    p["body_jaxpr"] = _transformed(ctx, p["body_jaxpr"], path, body_consts + carry)
    out_dep = carry
  else:  # cond: operand 0 is the branch index
    p["branches"] = tuple(_transformed(ctx, b, path, in_dep[1:]) for b in p["branches"])
    out_dep = [any(in_dep)] * len(eqn.outvars)
  subfuns, params = _jax_compat.bind_params(eqn.primitive, p)
  outs = eqn.primitive.bind(*subfuns, *ins, **params)
  outs = list(outs) if eqn.primitive.multiple_results else [outs]
  return outs, out_dep


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))  # tracers are jax.Arrays


def _run(fn, ctx: _Context, inputs, args, kwargs):
  """``fn(*args, **kwargs)`` traced to its program and evaluated with ``ctx``'s rules;
  array leaves are the program's arguments, everything else stays static."""
  wanted = set(range(1, len(args))) if inputs is None else set(inputs)
  leaves, treedef = jax.tree.flatten((args, kwargs))
  owner = []  # the positional argument of each leaf (None: a keyword argument)
  for pos, a in enumerate(args):
    owner += [pos] * len(jax.tree.leaves(a))
  owner += [None] * (len(leaves) - len(owner))
  dyn = [i for i, l in enumerate(leaves) if _is_array(l)]

  def flat_fn(*dyn_vals):
    full = list(leaves)
    for i, v in zip(dyn, dyn_vals):
      full[i] = v
    a, kw = jax.tree.unflatten(treedef, full)
    return fn(*a, **kw)

  dyn_vals = [leaves[i] for i in dyn]
  closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn_vals)
  dep_in = [owner[i] in wanted for i in dyn]
  outs, _ = _evaluate(ctx, closed.jaxpr, closed.consts, dyn_vals, None, dep_in)
  return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _root(fn, strip_root):
  return isinstance(getattr(fn, "__self__", None), nn.Module) if strip_root is None else strip_root


def sparsify(
  fn: Callable,
  rules,
  *,
  gradient: str = "straight_through",
  inputs: Sequence[int] | None = None,
  strip_root: bool | None = None,
) -> Callable:
  """``fn`` with activation sparsity: the same signature and outputs, the values the
  ``rules`` select replaced by their sparsified versions (module docstring).

  Args:
    fn: any JAX function, e.g. a Flax module's ``apply`` (``model.apply``).
    rules: a :class:`Rule` or a sequence of them (applied in order where several match).
    gradient: 'straight_through' (identity backward) or 'sparse' (masked backward).
    inputs: positional arguments that are the input (values depending on them are
      activations); default: every positional argument but the first (the variables).
    strip_root: drop the first name-stack component from module paths (a Flax model's
      class name); default: when ``fn`` is a bound method of a Flax module.

  Returns:
    ``g(*args, **kwargs)``, traced anew at each call (jit it: then once per shape).
  """
  rules = check_rules(rules)
  _check_gradient(gradient)
  root = _root(fn, strip_root)

  @functools.wraps(fn)
  def sparse_fn(*args, **kwargs):
    return _run(fn, _Context(rules, gradient, root, []), inputs, args, kwargs)

  return sparse_fn


def sites(
  fn: Callable, rules, *args, inputs=None, strip_root: bool | None = None, **kwargs
) -> list[dict]:
  """Where ``rules`` apply when ``fn(*args, **kwargs)`` runs (traced, not run):
  [{"rule": index, "kind": 'after' | 'module' | 'before', "path": module path, "shape":
  activation shape}] in program order.

  Raises:
    ValueError: a rule that matches no activation, naming it.
  """
  rules = check_rules(rules)
  ctx = _Context(rules, "straight_through", _root(fn, strip_root), [])
  jax.eval_shape(lambda *a: _run(fn, ctx, inputs, a, kwargs), *args)
  found = [{"rule": i, "kind": k, "path": p, "shape": s} for i, k, p, s in ctx.sites]
  unused = sorted(set(range(len(rules))) - {s["rule"] for s in found})
  if unused:
    raise ValueError(
      f"rules {[rules[i] for i in unused]} match no activation of the program (no "
      "input-dependent equation of that name, module output or linear op in that module)."
    )
  return found


class Sparsified(nn.Module):
  """A Flax module whose ``apply`` is ``model.apply`` with activation sparsity
  (:func:`sparsify`); ``init`` is the model's, so the variables are the model's own.
  Hashable (``rules`` a tuple): a static argument of jitted steps, e.g. in
  :func:`sparsejax.training.train`."""

  model: nn.Module
  rules: tuple
  gradient: str = "straight_through"

  def __post_init__(self):
    object.__setattr__(self, "rules", check_rules(self.rules))
    _check_gradient(self.gradient)
    super().__post_init__()

  @nn.nowrap
  def apply(self, variables, *args, **kwargs):
    return sparsify(self.model.apply, self.rules, gradient=self.gradient, strip_root=True)(
      variables, *args, **kwargs
    )

  @nn.nowrap
  def init(self, rngs, *args, **kwargs):
    return self.model.init(rngs, *args, **kwargs)

  def __call__(self, *args, **kwargs):
    raise ValueError(
      "ephemeral.Sparsified is applied through .apply(variables, x, ...), as a "
      "top-level model; it cannot be called as a submodule."
    )


__all__ = [
  "GRADIENTS",
  "PER",
  "Op",
  "Rule",
  "Sparsified",
  "Threshold",
  "TopK",
  "check_rules",
  "sites",
  "sparsify",
  "top_k_mask",
]
