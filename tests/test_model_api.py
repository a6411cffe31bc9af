"""Models as users bring them (issue 25, item 6): parameter trees with None leaves, NNX
modules, arrays (PRNG keys) among the call's keyword arguments, boxed (partitioned)
variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsejax
from sparsejax import effective, flops, masks, pruning, scores


def test_a_params_tree_with_none_leaves():
  """Equinox's eqx.partition leaves None where a leaf is not an array."""
  params = {"a": {"w": jnp.ones((3, 4)), "b": None}, "c": {"w": jnp.ones((4, 2))}}
  fn = lambda p, x: jnp.tanh(x @ p["a"]["w"]) @ p["c"]["w"]
  m = pruning.prune(
    "random/erk",
    key=jax.random.key(0),
    model=fn,
    variables=params,
    sparsity=0.5,
    input_shape=(3,),
    pruning_type="effective",
  )
  assert m["a"]["b"] is None and masks.paths(m) == ["a/w", "c/w"]
  assert effective.effective_compression(fn, m, (3,), params=params) >= 2.0
  assert flops.total(fn, m, (3,), params=params).params_direct == masks.count(m)[0]
  pruned = masks.apply(params, m)
  assert pruned["a"]["b"] is None
  bad = {"a": {"w": m["a"]["w"], "b": jnp.ones(2, bool)}, "c": m["c"]}
  try:
    masks.validate(bad, params)
  except ValueError as err:
    assert "a/b" in str(err)
  else:
    raise AssertionError("a mask where the parameter is None was accepted")


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.l2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def test_an_nnx_module_passed_directly():
  model = NNXNet(nnx.Rngs(0))
  m = pruning.prune(
    "synflow",
    key=jax.random.key(0),
    model=model,
    variables=None,
    sparsity=0.5,
    input_shape=(3,),
    rounds=3,
    pruning_type="effective",
  )
  assert masks.count(m)[1] == 3 * 4 + 4 * 2
  assert effective.effective_compression(model, m, (3,)) >= 2.0
  state = nnx.state(model, nnx.Param)
  assert masks.apply(state, m) is not None  # masks have the Param state's structure
  assert sparsejax.trace(model, (3,)) is sparsejax.trace(model, (3,))  # one trace


class Dropped(nn.Module):
  @nn.compact
  def __call__(self, x, rng=None):
    h = nn.Dense(4)(x)
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=rng is None)(h, rng=rng))


def test_a_prng_key_among_the_calls_keyword_arguments():
  model = Dropped()
  v = model.init(jax.random.key(0), jnp.ones((1, 3)))
  kw = {"rng": jax.random.key(1)}
  traced = sparsejax.trace(model, (3,), variables=v, apply_kwargs=kw)
  assert traced is sparsejax.trace(
    model, (3,), variables=v, apply_kwargs={"rng": jax.random.key(1)}
  )
  assert traced is not sparsejax.trace(
    model, (3,), variables=v, apply_kwargs={"rng": jax.random.key(2)}
  )
  m = pruning.prune(
    "snip",
    key=jax.random.key(0),
    model=model,
    variables=v,
    sparsity=0.5,
    input_shape=(3,),
    apply_kwargs=kw,
    batches=[{"image": jnp.ones((2, 3)), "label": jnp.array([0, 1])}],
  )
  assert masks.count(m)[1] == 3 * 4 + 4 * 3


class Boxed(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    return nn.Dense(3, kernel_init=init)(nn.relu(nn.Dense(4, kernel_init=init)(x)))


def test_boxed_partitioned_variables_everywhere_synflow_included():
  """The Flax lm1b/wmt style: nn.with_logical_partitioning boxes every kernel."""
  model = Boxed()
  v = model.init(jax.random.key(0), jnp.ones((1, 3)))
  traced = sparsejax.trace(model, (3,), variables=v)
  # The outer Dense(3) is built first (Dense_0) and called last: input-to-output order
  assert traced.prunable_paths == ["Dense_1/kernel/value", "Dense_0/kernel/value"]
  for name in ("synflow", "random/igq", "snip"):
    m = pruning.prune(
      name,
      key=jax.random.key(0),
      model=traced,
      variables=v,
      sparsity=0.5,
      rounds=3 if name == "synflow" else None,
      pruning_type="effective",
      batches=[{"image": jnp.ones((2, 3)), "label": jnp.array([0, 1])}],
    )
    assert masks.paths(m) == ["Dense_0/kernel/value", "Dense_1/kernel/value"]
    pruned = masks.apply(v["params"], m)
    kernels = [pruned["Dense_0"]["kernel"].value, pruned["Dense_1"]["kernel"].value]
    assert sum(int(np.count_nonzero(k)) for k in kernels) == masks.count(m)[0]
  s = scores.synflow_scores(traced, v)
  assert all(np.isfinite(np.asarray(a)).all() for a in masks.mask_leaves(s))
