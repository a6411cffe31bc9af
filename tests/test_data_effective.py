"""Data-dependent effective sparsity against a brute force over the unit graph, and
compaction of the units that never fire."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import data_effective as de
from sparsejax import ephemeral, models
from sparsejax import masks as masks_lib

WIDTHS = (6, 8, 7, 3)


def mlp(params, x):
  """A tiny ReLU MLP, apply(params, x): Dense-ReLU-Dense-ReLU-Dense."""
  for l in range(len(WIDTHS) - 1):
    x = x @ params[f"w{l}"] + params[f"b{l}"]
    if l < len(WIDTHS) - 2:
      x = jax.nn.relu(x)
  return x


def mlp_setup(seed: int, n: int = 24):
  rng = np.random.default_rng(seed)
  params, masks = {}, {}
  for l, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
    params[f"w{l}"] = rng.normal(size=(a, b)).astype(np.float32)
    # Negative biases make some hidden units dead on most or all examples.
    params[f"b{l}"] = (rng.normal(size=b) - (1.5 if l == 0 else 0.5)).astype(np.float32)
    masks[f"w{l}"] = rng.random((a, b)) < 0.6
    masks[f"b{l}"] = None
  x = rng.normal(size=(n, WIDTHS[0])).astype(np.float32)
  x[:, 0] = 0.0  # an input feature that is always 0
  x[rng.random(x.shape) < 0.2] = 0.0
  return params, masks, x


def brute_force(params, masks, x):
  """Per example: units are active when nonzero; a weight is effective when an active
  path from a nonzero input reaches it and one from it reaches a nonzero output; OR."""
  L = len(WIDTHS) - 1
  out = {f"w{l}": np.zeros((WIDTHS[l], WIDTHS[l + 1]), bool) for l in range(L)}
  for e in range(len(x)):
    vals = [x[e]]
    h = x[e]
    for l in range(L):
      w = np.where(masks[f"w{l}"], params[f"w{l}"], 0.0)
      h = h @ w + params[f"b{l}"]
      if l < L - 1:
        h = np.maximum(h, 0.0)
      vals.append(h)
    nz = [v != 0 for v in vals]
    reach = [nz[0]]
    for l in range(L):
      m = masks[f"w{l}"]
      reach.append(nz[l + 1] & (reach[l][:, None] & m).any(axis=0))
    coreach = [None] * (L + 1)
    coreach[L] = nz[L]
    for l in range(L - 1, -1, -1):
      m = masks[f"w{l}"]
      coreach[l] = nz[l] & (m & coreach[l + 1][None, :]).any(axis=1)
    for l in range(L):
      out[f"w{l}"] |= masks[f"w{l}"] & reach[l][:, None] & coreach[l + 1][None, :]
  return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_size", [5, 64])
def test_data_effective_masks_equal_the_brute_force(seed, batch_size):
  params, masks, x = mlp_setup(seed)
  got = de.data_effective(mlp, params, masks, x, batch_size=batch_size)
  want = brute_force(params, masks, x)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got.masks[k]), want[k], err_msg=k)
  assert got.examples == len(x)
  structural = sparsejax.effective_masks(mlp, masks, (WIDTHS[0],), params=params)
  for k in want:  # data-effective weights are effective weights
    assert not np.any(np.asarray(got.masks[k]) & ~np.asarray(structural[k]))
  total = sum(int(np.prod(params[f"w{l}"].shape)) for l in range(3))
  kept = sum(int(w.sum()) for w in want.values())
  assert got.data_effective_compression == pytest.approx(total / kept)
  assert got.data_effective_compression >= got.effective_compression


def test_never_active_units_and_activation_sparsity_per_layer():
  params, masks, x = mlp_setup(3, n=40)
  got = de.data_effective(mlp, params, masks, x, batch_size=16)
  L = len(WIDTHS) - 1
  h, acts = x, []
  for l in range(L):  # the hidden values each layer writes, and what each layer reads
    acts.append(h)
    w = np.where(masks[f"w{l}"], params[f"w{l}"], 0.0)
    h = h @ w + params[f"b{l}"]
    h = np.maximum(h, 0.0) if l < L - 1 else h
  assert [r["layer"] for r in got.layers] == ["w0", "w1", "w2"]
  for l, row in enumerate(got.layers):
    assert row["units"] == WIDTHS[l + 1]
    assert row["activation_sparsity"] == pytest.approx(np.mean(acts[l] == 0), abs=1e-6)
    # A unit with no data-effective incoming or outgoing weight never fires on a path.
    eff = np.asarray(got.masks[f"w{l}"])
    assert row["data_active_units"] == int(eff.any(axis=0).sum())
    assert row["never_active_fraction"] == pytest.approx(
      1 - row["data_active_units"] / row["units"]
    )


def test_one_example_at_a_time_or_together_is_the_same():
  params, masks, x = mlp_setup(1, n=9)
  together = de.data_effective(mlp, params, masks, x, batch_size=9).masks
  alone = [
    de.data_effective(mlp, params, masks, x[i : i + 1], batch_size=1).masks for i in range(9)
  ]
  for k in together:
    if together[k] is None:
      continue
    union = np.any([np.asarray(a[k]) for a in alone], axis=0)
    np.testing.assert_array_equal(np.asarray(together[k]), union)


def test_top_k_activations_gate_units_too():
  """Top-k after each ReLU (ephemeral sparsity): fewer units fire, so fewer weights are
  effective on the data; the brute force with the top-k applied agrees."""
  params, masks, x = mlp_setup(2)
  sparse = ephemeral.sparsify(mlp, ephemeral.Rule(ephemeral.TopK(k=2), primitive="relu"))
  got = de.data_effective(sparse, params, masks, x, batch_size=8)
  plain = de.data_effective(mlp, params, masks, x, batch_size=8)
  for k in ("w0", "w1", "w2"):
    assert not np.any(np.asarray(got.masks[k]) & ~np.asarray(plain.masks[k]))
  assert got.data_effective_compression >= plain.data_effective_compression


def test_compaction_on_data_keeps_the_function_on_the_data_only():
  model = models.create("lenet300100")
  key = jax.random.key(0)
  variables = models.init(model, key, (28, 28, 1))
  params = variables["params"]
  # Push half of the first layer's units below zero: they never fire on this data.
  dead = np.arange(300) % 2 == 0
  bias = np.where(dead, -1e3, 0.0).astype(np.float32)
  norm = {**params["norm_0"], "bias": jnp.asarray(bias)}
  variables = {**variables, "params": {**params, "norm_0": norm}}
  net = sparsejax.trace(model, (28, 28, 1), variables=variables)
  masks = net.ones()
  x = np.asarray(jax.random.normal(jax.random.key(1), (64, 28, 28, 1)))
  got = de.data_effective(model, variables, masks, x, batch_size=32, compact=True)
  assert got.layers[0]["data_active_units"] <= 150
  assert got.layers[0]["never_active_fraction"] >= 0.5
  new_model, new_vars, new_masks = got.compacted
  assert new_model.hidden[0] <= 150
  masked = {**variables, "params": masks_lib.apply(variables["params"], masks)}
  y = model.apply(masked, x, train=False)
  y_new = new_model.apply(
    {**new_vars, "params": masks_lib.apply(new_vars["params"], new_masks)}, x, train=False
  )
  np.testing.assert_allclose(np.asarray(y_new), np.asarray(y), rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
  params, masks, x = mlp_setup(0)
  with pytest.raises(ValueError, match="inputs"):
    de.data_effective(mlp, params, masks, x[:, :3])
  with pytest.raises(ValueError, match="batch_size"):
    de.data_effective(mlp, params, masks, x, batch_size=0)
  with pytest.raises(ValueError, match="inputs"):
    de.data_effective(mlp, params, masks, x[:0])


def test_default_apply_kwargs_pass_train_only_to_a_call_that_takes_it():
  """{'train': False} for a Flax module (or a Sparsified wrapper of one) whose call takes
  ``train``; nothing for a module whose call does not."""
  import flax.linen as nn

  class NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))

  lenet = models.create("lenet300100")
  wrapped = ephemeral.Sparsified(lenet, (ephemeral.Rule(ephemeral.TopK(k=2), primitive="relu"),))
  assert de._default_apply_kwargs(NoTrain()) == {}
  assert de._default_apply_kwargs(lenet) == {"train": False}
  assert de._default_apply_kwargs(wrapped) == {"train": False}
  assert de._default_apply_kwargs(mlp) == {}
  model = NoTrain()
  x = np.asarray(jax.random.normal(jax.random.key(0), (8, 4)))
  variables = model.init(jax.random.key(1), x)
  masks = {
    k: {"kernel": np.ones(v["kernel"].shape, bool), "bias": None}
    for k, v in variables["params"].items()
  }
  got = de.data_effective(model, variables, masks, x, batch_size=8)
  assert got.data_effective_compression >= 1.0
