"""A user's mistake gets a clear error naming the argument, before any work, from the
library's public functions (issue 28, rows 2 and 7)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax import effective, masks, models, optim, pruning, registry, scores

SHAPE = (28, 28, 1)


@pytest.fixture(scope="module")
def lenet():
  model = models.create("lenet300100")
  return model, model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))


def test_a_registered_score_of_the_wrong_shape_is_refused(lenet):
  """A score tree must hold one score per weight: an arange(3) per layer once gave
  masks of shape (3,) and a compression of inf (ERK) or 9.0 (global), silently."""
  model, v = lenet

  def three_per_layer(c):
    return masks.map_prunable(lambda w: jnp.arange(3.0), c.params, prunable=c.prunable)

  for quota in ("erk", None):
    p = registry.Pruner("toy/three", three_per_layer, quota)
    with pytest.raises(
      ValueError,
      match=r"'toy/three' returned scores of shape \(3,\) at "
      r"'dense_0/kernel', whose weight has shape \(784, 300\)",
    ):
      pruning.prune(
        p, key=jax.random.key(1), model=model, variables=v, sparsity=0.9, input_shape=SHAPE
      )


def test_an_input_shape_that_does_not_fit_the_variables_is_named(lenet):
  model, v = lenet
  with pytest.raises(
    ValueError,
    match=r"input_shape=\(32, 32, 3\) does not fit the model's "
    r"variables.*dense_0",
  ):
    pruning.prune(
      "random/igq",
      key=jax.random.key(1),
      model=model,
      variables=v,
      sparsity=0.9,
      input_shape=(32, 32, 3),
    )
  with pytest.raises(ValueError, match=r"input_shape=\(32, 32, 3\) does not fit"):
    effective.effective_masks(model, sparsejax.trace(model, SHAPE).ones(), (32, 32, 3), variables=v)


@pytest.mark.parametrize("key", [1, "0", np.zeros(3, np.uint32), None])
def test_a_key_that_is_no_prng_key_is_named(lenet, key):
  model, v = lenet
  with pytest.raises(ValueError, match=r"key=.* must be one JAX PRNG key"):
    pruning.prune("random/igq", key=key, model=model, variables=v, sparsity=0.9, input_shape=SHAPE)
  # both kinds of real keys work
  for good in (jax.random.key(1), jax.random.PRNGKey(1)):
    pruning.prune("random/igq", key=good, model=model, variables=v, sparsity=0.9, input_shape=SHAPE)


class Small(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(len(x), -1))))


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [-1, 0, 1, 2]])
def test_snip_refuses_labels_outside_the_classes(labels):
  model = Small()
  v = model.init(jax.random.key(0), jnp.ones((1, 5)))
  batch = {"image": jnp.ones((4, 5)), "label": jnp.asarray(labels)}
  message = r"labels must be class indices in \[0, 3\) \(the model has 3 outputs\)"
  with pytest.raises(ValueError, match="snip: batch " + message):
    scores.snip(model, v, [batch])
  with pytest.raises(ValueError, match="iterative_snip: batch " + message):
    scores.iterative_snip(model, v, [batch], sparsity=0.5, rounds=2)
  with pytest.raises(ValueError, match="grasp: batch " + message):
    scores.grasp(model, v, [batch])
  with pytest.raises(ValueError, match=message):
    pruning.prune(
      "snip", key=jax.random.key(0), model=model, variables=v, sparsity=0.5, batches=[batch]
    )
  ok = {"image": jnp.ones((4, 5)), "label": jnp.asarray([0, 1, 2, 2])}
  scores.snip(model, v, [ok])


def test_with_masks_refuses_params_that_are_not_zero_where_pruned(lenet):
  model, v = lenet
  m = pruning.prune(
    "random/igq", key=jax.random.key(1), model=model, variables=v, sparsity=0.9, input_shape=SHAPE
  )
  tx = optim.with_masks(optax.sgd(0.1), m)
  with pytest.raises(ValueError, match=r"nonzero weights where masks prune.*masks.apply"):
    tx.init(v["params"])
  tx.init(masks.apply(v["params"], m))
