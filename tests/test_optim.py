"""sparsejax.optim.with_masks: pruned weights stay exactly 0 under any inner optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from sparsejax import masks as masks_lib
from sparsejax import optim


def tree(key):
  k1, k2, k3 = jax.random.split(key, 3)
  params = {
    "dense": {"kernel": jax.random.normal(k1, (6, 5)), "bias": jnp.ones(5)},
    "conv": {"kernel": jax.random.normal(k2, (3, 3, 2, 4)), "bias": jnp.zeros(4)},
    "norm": {"scale": jnp.ones(4)},
  }
  masks = {
    "dense": {"kernel": jax.random.bernoulli(k3, 0.3, (6, 5)), "bias": None},
    "conv": {"kernel": jax.random.bernoulli(k1, 0.5, (3, 3, 2, 4)), "bias": None},
    "norm": {"scale": None},
  }
  return params, masks


INNER = {
  "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
}


def run_steps(tx, params, steps, key, jit=True):
  """``steps`` updates with gradients N(0, 1) from ``fold_in(key, t)``; jitted as one
  ``fori_loop``, or op by op."""
  state = tx.init(params)

  def step(t, carry):
    params, state = carry
    k = jax.random.fold_in(key, t)
    grads = jax.tree.map(lambda p: jax.random.normal(k, p.shape), params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    return jax.jit(lambda c: jax.lax.fori_loop(0, steps, step, c))((params, state))
  carry = (params, state)
  for t in range(steps):
    carry = step(t, carry)
  return carry


@pytest.mark.parametrize("name", sorted(INNER))
def test_pruned_weights_stay_exactly_zero_for_1000_steps(name):
  params, masks = tree(jax.random.key(0))
  params = masks_lib.apply(params, masks)
  final, _ = run_steps(optim.with_masks(INNER[name](), masks), params, 1000, jax.random.key(1))
  for w, m in zip(
    masks_lib.mask_leaves(masks_lib.map_masks(lambda m, w: w, masks, final)),
    masks_lib.mask_leaves(masks),
  ):
    assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
    assert np.mean(np.asarray(w)[np.asarray(m)] != 0.0) > 0.99  # kept weights train
  # Unwrapped, the same optimizer revives pruned weights (the test can fail).
  revived, _ = run_steps(INNER[name](), params, 3, jax.random.key(1))
  assert np.any(np.asarray(revived["dense"]["kernel"])[~np.asarray(masks["dense"]["kernel"])])


@pytest.mark.parametrize("name", sorted(INNER))
def test_all_ones_masks_equal_the_inner_transformation_exactly(name):
  params, masks = tree(jax.random.key(2))
  ones = masks_lib.map_masks(jnp.ones_like, masks)
  # Op by op, the wrapped transformation computes exactly what the inner one does.
  wrapped, _ = run_steps(
    optim.with_masks(INNER[name](), ones), params, 20, jax.random.key(3), jit=False
  )
  plain, _ = run_steps(INNER[name](), params, 20, jax.random.key(3), jit=False)
  jax.tree.map(np.testing.assert_array_equal, wrapped, plain)
  # Jitted, XLA may fuse the two programs differently (Adam's sqrt/div): 1-ulp level.
  wrapped, _ = run_steps(optim.with_masks(INNER[name](), ones), params, 20, jax.random.key(3))
  plain, _ = run_steps(INNER[name](), params, 20, jax.random.key(3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), wrapped, plain)


def test_update_matches_the_closed_form_of_masked_sgd():
  """update = -lr * m * g with plain SGD (jitted)."""
  params, masks = tree(jax.random.key(4))
  params = masks_lib.apply(params, masks)
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0), params)
  tx = optim.with_masks(optax.sgd(0.5), masks)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(
    updates["dense"]["kernel"], np.where(masks["dense"]["kernel"], -1.5, 0.0)
  )
  np.testing.assert_array_equal(updates["dense"]["bias"], np.full(5, -1.5))  # unmasked
  np.testing.assert_array_equal(updates["norm"]["scale"], np.full(4, -1.5))


def test_replacing_masks_between_steps_does_not_recompile():
  params, masks = tree(jax.random.key(5))
  params = masks_lib.apply(params, masks)
  tx = optim.with_masks(optax.adam(1e-2), masks)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state)
  new_masks = masks_lib.map_masks(lambda m: ~m, masks)
  state = optim.replace_masks(state, new_masks)
  params, state = step(params, state)
  assert step._cache_size() == 1
  assert optim.get_masks(state) is new_masks or jax.tree.all(
    jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), optim.get_masks(state), new_masks)
  )
  updates, _ = tx.update(grads, state, params)  # the new masks apply
  assert np.all(np.asarray(updates["dense"]["kernel"])[np.asarray(masks["dense"]["kernel"])] == 0.0)
  with pytest.raises(ValueError, match="differ in shape or dtype"):
    optim.replace_masks(state, masks_lib.map_masks(lambda m: m.astype(jnp.float32), masks))
  with pytest.raises(ValueError, match="holds no WithMasksState"):
    optim.get_masks(optax.adam(1e-2).init(params))


def test_masks_are_found_inside_chains_and_none_means_dense():
  params, masks = tree(jax.random.key(6))
  params = masks_lib.apply(params, masks)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.with_masks(optax.sgd(0.1), masks))
  state = tx.init(params)
  assert optim.get_masks(state) is not None
  dense = optim.with_masks(optax.sgd(0.1), None)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = dense.update(grads, dense.init(params), params)
  assert optim.get_masks(dense.init(params)) is None
  jax.tree.map(lambda u: np.testing.assert_allclose(u, -0.1), updates)


def test_mismatched_masks_are_rejected_at_init():
  params, masks = tree(jax.random.key(7))
  bad = {**masks, "dense": {"kernel": jnp.ones((5, 6), bool), "bias": None}}
  with pytest.raises(ValueError, match="masks"):
    optim.with_masks(optax.sgd(0.1), bad).init(params)


def test_orbax_round_trip_of_the_state(tmp_path):
  params, masks = tree(jax.random.key(8))
  tx = optim.with_masks(optax.adamw(1e-2, weight_decay=0.1), masks)
  _, state = run_steps(tx, masks_lib.apply(params, masks), 3, jax.random.key(9))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(tmp_path / "state", state)
  ckptr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckptr.restore(tmp_path / "state", abstract)
  assert isinstance(restored, optim.WithMasksState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored.masks["dense"]["bias"] is None


def test_extra_arguments_reach_the_inner_optimizer_lbfgs():
  """with_masks is a GradientTransformationExtraArgs: optax.lbfgs's line search gets
  value, grad and value_fn through it, and pruned weights stay exactly 0."""
  params, masks = tree(jax.random.key(4))
  params = masks_lib.apply(params, masks)
  target = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)

  def loss(p):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target)))

  tx = optim.with_masks(optax.lbfgs(), masks)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  state = tx.init(params)
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(params, state):
    value, grad = value_and_grad(params, state=state)
    updates, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  first = loss(params)
  for _ in range(10):
    params, state = step(params, state)
  assert loss(params) < 0.5 * first
  for w, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks, is_leaf=lambda x: x is None)):
    if m is not None:
      np.testing.assert_array_equal(np.asarray(w)[~np.asarray(m)], 0.0)
      assert np.all(np.asarray(w)[np.asarray(m)] != 0)


def test_init_refuses_params_not_zero_where_pruned():
  params, masks = tree(jax.random.key(5))
  with pytest.raises(ValueError, match=r"nonzero weights where masks prune.*masks.apply"):
    optim.with_masks(optax.sgd(0.1), masks).init(params)
  optim.with_masks(optax.sgd(0.1), masks).init(masks_lib.apply(params, masks))  # fine
  optim.with_masks(optax.sgd(0.1), masks, straight_through=True).init(params)  # dense by design
