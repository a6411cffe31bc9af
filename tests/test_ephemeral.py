"""Activation sparsity as a program transform: top-k and thresholds at chosen activations,
their gradients, loops, and training a sparsified model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs
from sparsejax import data, ephemeral, models, training
from sparsejax.ephemeral import Rule, Threshold, TopK


def brute_top_k(a: np.ndarray, k: int) -> np.ndarray:
  """Per row: the k largest |a|, ties by lower index (a stable sort)."""
  out = np.zeros(a.shape, bool)
  for r in range(a.shape[0]):
    order = np.argsort(-np.abs(a[r]), kind="stable")[:k]
    out[r, order] = True
  return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_top_k_keeps_exactly_k_per_example_ties_by_position(seed, k):
  rng = np.random.default_rng(seed)
  # Few distinct values (and zeros, as after a ReLU): many ties.
  a = rng.integers(-2, 3, size=(5, 3, 4)).astype(np.float32)
  mask = np.asarray(ephemeral.top_k_mask(jnp.asarray(a), k, "example"))
  assert mask.reshape(5, -1).sum(axis=1).tolist() == [k] * 5
  np.testing.assert_array_equal(mask.reshape(5, -1), brute_top_k(a.reshape(5, -1), k))
  per_token = np.asarray(ephemeral.top_k_mask(jnp.asarray(a), min(k, 4), "token"))
  assert (per_token.sum(axis=-1) == min(k, 4)).all()
  np.testing.assert_array_equal(per_token.reshape(-1, 4), brute_top_k(a.reshape(-1, 4), min(k, 4)))


def two_layer(v, x):
  return jnp.tanh(x @ v["w1"]) @ v["w2"]


def two_layer_setup():
  rng = np.random.default_rng(0)
  v = {
    "w1": jnp.asarray(rng.normal(size=(6, 20)), jnp.float32),
    "w2": jnp.asarray(rng.normal(size=(20, 3)), jnp.float32),
  }
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  return v, x


def test_top_k_after_an_activation_keeps_exactly_k_nonzeros_per_example():
  v, x = two_layer_setup()
  rule = Rule(TopK(k=5), primitive="tanh")
  f = ephemeral.sparsify(two_layer, rule)
  sites = ephemeral.sites(two_layer, rule, v, x)
  assert [(s["kind"], s["shape"]) for s in sites] == [("after", (4, 20))]
  h = jnp.tanh(x @ v["w1"])
  keep = ephemeral.top_k_mask(h, 5)
  np.testing.assert_allclose(f(v, x), jnp.where(keep, h, 0) @ v["w2"], rtol=1e-6)
  tapped = ephemeral.sparsify(lambda v, x: jnp.tanh(x @ v["w1"]), rule)(v, x)
  assert (np.count_nonzero(np.asarray(tapped), axis=1) == 5).all()


def test_threshold_and_the_two_gradients():
  v, x = two_layer_setup()
  rule = Rule(Threshold(0.5), primitive="tanh")
  h = jnp.tanh(x @ v["w1"])
  keep = jnp.abs(h) > 0.5
  st = ephemeral.sparsify(two_layer, rule)
  sparse = ephemeral.sparsify(two_layer, rule, gradient="sparse")
  want = jnp.where(keep, h, 0) @ v["w2"]
  np.testing.assert_allclose(st(v, x), want, rtol=1e-6)
  np.testing.assert_allclose(sparse(v, x), want, rtol=1e-6)
  # Straight through: dL/dh as if nothing was dropped; sparse: zero at dropped entries.
  g_st = jax.grad(lambda w1: st({**v, "w1": w1}, x).sum())(v["w1"])
  g_sparse = jax.grad(lambda w1: sparse({**v, "w1": w1}, x).sum())(v["w1"])
  dh = jnp.broadcast_to(v["w2"].sum(axis=1), h.shape)
  np.testing.assert_allclose(g_st, x.T @ (dh * (1 - h**2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_sparse, x.T @ (dh * (1 - h**2) * keep), rtol=1e-5, atol=1e-6)


def test_rules_by_module_output_and_before_a_linear_op():
  model = models.create("lenet300100")
  v = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  before = ephemeral.sites(model.apply, Rule(TopK(k=7), before="dense_*"), v, x)
  assert [(s["path"], s["shape"]) for s in before] == [
    ("dense_0", (3, 784)),
    ("dense_1", (3, 300)),
    ("dense_2", (3, 100)),
  ]
  relus = ephemeral.sites(model.apply, Rule(TopK(fraction=0.1), primitive="relu"), v, x)
  assert [s["shape"] for s in relus] == [(3, 300), (3, 100)]
  out = ephemeral.sites(model.apply, Rule(Threshold(0.1), module="norm_1"), v, x)
  assert [(s["kind"], s["path"]) for s in out] == [("module", "norm_1")]
  # Keeping all 300 inputs of dense_1 is the model itself; keeping 30 is not.
  plain = model.apply(v, x)
  every = ephemeral.Sparsified(model, (Rule(TopK(k=300), before="dense_1"),)).apply(v, x)
  np.testing.assert_array_equal(np.asarray(every), np.asarray(plain))
  few = ephemeral.Sparsified(model, (Rule(TopK(k=30), before="dense_1"),)).apply(v, x)
  assert not np.allclose(np.asarray(few), np.asarray(plain))
  with pytest.raises(ValueError, match="match no activation"):
    ephemeral.sites(model.apply, Rule(TopK(k=3), primitive="gelu"), v, x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.gelu(nn.Dense(8, name="fc1")(x))
    return x + nn.Dense(4, name="fc2")(h), None


class Stack(nn.Module):
  """Two residual MLP blocks under nn.scan (a transformer's layer stack)."""

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    x, _ = layers(name="layers")(x, None)
    return x


def test_per_token_top_k_inside_a_scanned_layer_stack():
  model = Stack()
  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  v = model.init(jax.random.key(0), x)
  rule = Rule(TopK(k=3, per="token"), before="layers/fc2")
  got = jax.jit(ephemeral.Sparsified(model, (rule,)).apply)(v, x)
  p = v["params"]["layers"]
  y = x
  for l in range(2):
    h = nn.gelu(y @ p["fc1"]["kernel"][l] + p["fc1"]["bias"][l])
    h = jnp.where(ephemeral.top_k_mask(h, 3, "token"), h, 0)
    y = y + h @ p["fc2"]["kernel"][l] + p["fc2"]["bias"][l]
  np.testing.assert_allclose(np.asarray(got), np.asarray(y), rtol=1e-5, atol=1e-6)
  grads = jax.grad(
    lambda v: got.sum() * 0 + ephemeral.Sparsified(model, (rule,)).apply(v, x).sum()
  )(v)
  assert jax.tree.structure(grads) == jax.tree.structure(v)


def test_a_sparsified_model_trains_in_the_training_loop():
  model = ephemeral.Sparsified(
    models.create("lenet300100"), (Rule(TopK(fraction=0.2), primitive="relu"),)
  )
  config = configs.get_config("lenet300100", batch_size=32, train_steps=6)
  train = data.synthetic_split("mnist", "train", 256)
  test = data.synthetic_split("mnist", "test", 64)
  result = training.train(model, "mnist", config, train, test, eval_every=6, log_every=6)
  assert np.isfinite(result.final_test_loss)
  assert hash(model) == hash(
    ephemeral.Sparsified(
      models.create("lenet300100"), (Rule(TopK(fraction=0.2), primitive="relu"),)
    )
  )


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="exactly one of k and fraction"):
    TopK()
  with pytest.raises(ValueError, match="k="):
    TopK(k=0)
  with pytest.raises(ValueError, match="fraction="):
    TopK(fraction=1.5)
  with pytest.raises(ValueError, match="per="):
    TopK(k=1, per="row")
  with pytest.raises(ValueError, match="threshold="):
    Threshold(-1.0)
  with pytest.raises(ValueError, match="needs primitive="):
    Rule(TopK(k=1))
  with pytest.raises(ValueError, match="op="):
    Rule("topk", primitive="relu")
  with pytest.raises(ValueError, match="gradient="):
    ephemeral.sparsify(two_layer, Rule(TopK(k=1), primitive="tanh"), gradient="none")
  with pytest.raises(ValueError, match="rules="):
    ephemeral.sparsify(two_layer, [])


def test_readme_activation_sparsity_example_runs():
  import os
  import pathlib
  import subprocess
  import sys

  repo = pathlib.Path(__file__).resolve().parents[1]
  readme = (repo / "README.md").read_text()
  section = readme.split("### Activation sparsity and effective sparsity on data", 1)[1]
  code = section.split("```python", 1)[1].split("```", 1)[0]
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    env={**os.environ, "PYTHONPATH": str(repo)},
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  compression, fractions = out.stdout.strip().split(" ", 1)
  assert float(compression) > 1.0 and fractions.startswith("[")
