"""Mask updates inside the jitted step against the between-steps path, the optimizer-state
reset of grown weights, honest step timing, AC/DC's schedule and block sparsity."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from experiments import configs
from sparsejax import blocks, data, dynamic, optim, pruning, training
from sparsejax import masks as masks_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyMLP(nn.Module):
  """Dense 32 -> batch norm -> ReLU -> Dense classes."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(32, name="dense_0")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm_0")(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name="dense_1")(x)


def setup(density=1.0, seed=0):
  model = TinyMLP()
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))
  net = sparsejax.trace(model, (28, 28, 1), variables=variables)
  masks = net.ones()
  if density < 1.0:
    masks = masks_lib.random(jax.random.key(seed + 1), masks, 1.0 - density)
  return model, variables, masks


def flat(tree):
  return [np.asarray(x).reshape(-1) for x in masks_lib.mask_leaves(tree)]


UPDATERS = {
  "gmp": (1.0, lambda: dynamic.GradualMagnitude(0.9, start=2, end=14, every=3)),
  "gmp-igq": (1.0, lambda: dynamic.GradualMagnitude(0.8, start=0, end=9, every=3, quota="igq")),
  "set": (0.2, lambda: dynamic.SET(end=16, every=3)),
  "rigl": (0.2, lambda: dynamic.RigL(end=16, every=3)),
  "ste": (1.0, lambda: dynamic.STE(0.9, every=4)),
  "acdc": (1.0, lambda: dynamic.ACDC(0.9, start=2, end=12, every=3)),
  "acdc-block": (1.0, lambda: dynamic.ACDC(0.8, start=1, end=9, every=2, block=(4, 4))),
  "gmp-block": (1.0, lambda: dynamic.BlockMagnitude(0.9, start=0, end=12, every=4, block=4)),
}


@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_update_due_is_is_update_step_in_jit(name):
  updater = UPDATERS[name][1]()
  due = jax.jit(updater.update_due)
  got = [bool(due(jnp.int32(t))) for t in range(30)]
  assert got == [updater.is_update_step(t) for t in range(30)]
  assert any(got)


@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_in_jit_and_between_steps_give_bit_identical_masks(name):
  """The same schedule on the same (params, grads) sequence: Python's is_update_step +
  update between steps, and masks_in_step's lax.cond in one jitted step."""
  density, make = UPDATERS[name]
  updater = make()
  _, variables, masks = setup(density)
  rng = np.random.default_rng(0)
  in_jit = jax.jit(lambda p, g, m, t, k: dynamic.masks_in_step(updater, p, g, m, t, k))
  host, device = masks, masks
  for t in range(20):
    params = jax.tree.map(
      lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), variables["params"]
    )
    grads = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
    key = jax.random.key(t)
    if updater.is_update_step(t):
      g = grads if updater.needs_grads else None
      host = updater.update(masks_lib.apply(params, host), g, host, jnp.int32(t), key)
    device, stats = in_jit(masks_lib.apply(params, device), grads, device, jnp.int32(t), key)
    assert bool(stats["updated"]) == updater.is_update_step(t)
    for a, b in zip(flat(host), flat(device)):
      np.testing.assert_array_equal(a, b, err_msg=f"step {t}")


@pytest.fixture(scope="module")
def mnist_like():
  return data.synthetic_split("mnist", "train", 512), data.synthetic_split("mnist", "test", 100)


def _train(mnist_like, updater, masks, variables, **kw):
  train_data, test_data = mnist_like
  cfg = configs.get_config("lenet300100", batch_size=32, train_steps=24)
  return training.train(
    TinyMLP(),
    "mnist",
    cfg,
    train_data,
    test_data,
    masks=masks,
    params=variables["params"],
    updater=updater,
    eval_every=24,
    log_every=5,
    **kw,
  )


@pytest.mark.parametrize(
  "name",
  # RigL (gradients, regrowth, the optimizer-state reset) by default; GMP's and AC/DC's
  # masks in the step are checked bit for bit above, their training runs on request.
  ["rigl"] + [pytest.param(n, marks=pytest.mark.exhaustive) for n in ("gmp", "acdc")],
)
def test_training_in_jit_follows_the_between_steps_run(name, mnist_like):
  density, make = UPDATERS[name]
  _, variables, masks = setup(density)
  between = _train(mnist_like, make(), masks, variables)
  inside = _train(mnist_like, make(), masks, variables, update_in_jit=True)
  for a, b in zip(flat(between.state.masks), flat(inside.state.masks)):
    np.testing.assert_array_equal(a, b)
  strip = lambda rs: [{k: r[k] for k in ("step", "kept", "dropped", "grown")} for r in rs]
  assert strip(inside.mask_updates) == strip(between.mask_updates)
  assert len(inside.mask_updates) == sum(make().is_update_step(t) for t in range(24))
  # The weights agree to float rounding: XLA fuses the one program differently.
  for a, b in zip(jax.tree.leaves(between.state.params), jax.tree.leaves(inside.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert inside.update_seconds == [] and len(between.update_seconds) == len(between.mask_updates)


def test_in_jit_refuses_what_needs_the_host(mnist_like):
  _, variables, masks = setup(0.2)
  with pytest.raises(ValueError, match="update_in_jit"):
    _train(
      mnist_like,
      dynamic.RigL(end=16, every=3),
      masks,
      variables,
      update_in_jit=True,
      track_effective=True,
    )

  class NoSchedule(dynamic.BaseUpdater):
    def is_update_step(self, step):
      return False

  with pytest.raises(ValueError, match="no in-jit schedule"):
    _train(mnist_like, NoSchedule(), masks, variables, update_in_jit=True)


def test_grown_weights_start_with_zero_optimizer_state():
  _, variables, dense = setup()
  _, _, masks = setup(0.3)
  params = variables["params"]
  tx = sparsejax.with_masks(optax.adam(1e-2), dense)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):  # moments at every weight
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  # Prune to the sparse masks: the pruned weights keep their (stale) moments.
  params = masks_lib.apply(params, masks)
  opt_state = sparsejax.replace_masks(opt_state, masks)
  # RigL grows pruned weights back: with the reset their moments are 0, else stale.
  rigl = dynamic.RigL(end=100, every=1, drop_fraction=0.5)
  key = jax.random.key(0)
  step = jax.jit(
    lambda p, s, t, reset: dynamic.update_in_step(
      rigl, p, s, t, key, grads=grads, reset_optimizer_state=reset
    ),
    static_argnums=3,
  )
  for reset in (True, False):
    old = optim.get_masks(opt_state)
    new_params, new_state, stats = step(params, opt_state, jnp.int32(1), reset)
    new = optim.get_masks(new_state)
    grown = [n & ~o for n, o in zip(flat(new), flat(old))]
    assert int(stats["grown"]) == sum(int(g.sum()) for g in grown) > 0
    adam = new_state.inner_state[0]
    for moments in (adam.mu, adam.nu):
      m = flat(masks_lib.map_masks(lambda _, x: x, new, moments))
      at_grown = np.concatenate([x[g] for x, g in zip(m, grown)])
      kept = np.concatenate([x[n & o] for x, n, o in zip(m, flat(new), flat(old))])
      assert (at_grown == 0).all() if reset else (at_grown != 0).any()
      assert (kept != 0).all()
    for w, n in zip(flat(masks_lib.map_masks(lambda _, x: x, new, new_params)), flat(new)):
      assert (w[~n] == 0).all()


def test_readme_in_jit_example_runs_in_a_plain_user_loop():
  readme = (REPO / "README.md").read_text()
  section = readme.split("### Mask updates inside the jitted step", 1)[1]
  code = section.split("```python", 1)[1].split("```", 1)[0]
  assert "update_in_step" in code
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    env={**os.environ, "PYTHONPATH": str(REPO)},
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "kept 192 of 1920 weights" in out.stdout


class SlowRigL(dynamic.RigL):
  """RigL whose update takes a second on the host (a slow update between steps)."""

  def update(self, params, grads, masks, step, key, sweep=None):
    time.sleep(1.0)
    return super().update(params, grads, masks, step, key, sweep=sweep)


def test_steps_per_second_leaves_out_mask_updates_and_reports_them(mnist_like):
  _, variables, masks = setup(0.2)
  updater = SlowRigL(end=20, every=6)
  result = _train(mnist_like, updater, masks, variables)
  updates = [t for t in range(24) if updater.is_update_step(t)]
  assert [r["step"] for r in result.mask_updates] == updates == [6, 12, 18]
  assert len(result.update_seconds) == 3 and min(result.update_seconds) >= 1.0
  # Counted in, the three seconds would cap the speed at 23 steps / 3 s < 8 steps/s.
  assert result.steps_per_second > 10


def test_acdc_alternates_compressed_and_decompressed_phases(mnist_like):
  _, variables, masks = setup()
  acdc = dynamic.ACDC(0.9, start=2, end=17, every=4)
  result = _train(mnist_like, acdc, masks, variables)
  total = masks_lib.count(masks)[1]
  k = round(0.1 * total)
  got = [(r["step"], r["kept"]) for r in result.mask_updates]
  # Dense until 2, compressed 2-5, dense 6-9, compressed 10-13, dense 14-16, compressed 17-.
  assert got == [(2, k), (6, total), (10, k), (14, total), (17, k)]
  assert masks_lib.count(result.state.masks)[0] == k
  assert [bool(acdc.compressed(t)) for t in (0, 1, 2, 5, 6, 9, 10, 14, 16, 17, 23)] == [
    False, False, True, True, False, False, True, False, False, True, True,
  ]  # fmt: skip
  for w, m in zip(
    flat(masks_lib.map_masks(lambda _, x: x, result.state.masks, result.state.params)),
    flat(result.state.masks),
  ):
    assert (w[~m] == 0).all()


def assert_whole_blocks(masks, block):
  br, bc = blocks.check_block(block)
  for m in masks_lib.mask_leaves(masks):
    m = np.asarray(m)
    mat = m.reshape(-1, m.shape[-1])
    for i in range(0, mat.shape[0], br):
      for j in range(0, mat.shape[1], bc):
        b = mat[i : i + br, j : j + bc]
        assert b.all() or not b.any(), (i, j)


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("block", [4, (2, 3)])
def test_block_masks_are_whole_blocks_ranked_by_their_score(reduce, block):
  _, variables, masks = setup()
  params = variables["params"]
  got = blocks.block_masks(params, masks, 0.25, block, reduce)
  assert_whole_blocks(got, block)
  kept, total = masks_lib.count(got)
  assert kept <= np.floor(0.25 * total) and kept > 0.25 * total - np.prod(blocks.check_block(block))
  # Every kept block scores at least as high as every pruned one.
  kept_s, pruned_s = [], []
  for w, m in zip(
    masks_lib.mask_leaves(masks_lib.map_masks(lambda _, x: x, masks, params)),
    masks_lib.mask_leaves(got),
  ):
    s = np.asarray(blocks.block_scores(w, block, reduce)).reshape(-1)
    mat = np.asarray(m).reshape(-1, m.shape[-1])
    br, bc = blocks.check_block(block)
    keep = mat[::br, ::bc].reshape(-1)
    kept_s += list(s[keep])
    pruned_s += list(s[~keep])
  assert min(kept_s) >= max(pruned_s)


def test_block_updater_and_pruners_give_whole_blocks():
  model, variables, masks = setup()
  gmp = dynamic.BlockMagnitude(0.9, start=0, end=10, every=5, block=4)
  m = masks
  for t in (0, 5, 10):
    new = gmp.update(variables["params"], None, m, jnp.int32(t), None)
    assert_whole_blocks(new, 4)
    for a, b in zip(flat(new), flat(m)):  # pruned blocks never come back
      assert not (a & ~b).any()
    m = new
  assert masks_lib.direct_sparsity(m) >= 0.9
  net = sparsejax.trace(model, (28, 28, 1), variables=variables)
  for pruning_type in ("direct", "effective"):
    got = pruning.prune(
      "block/4x4/max",
      key=jax.random.key(0),
      model=net,
      variables=variables,
      sparsity=0.95,
      pruning_type=pruning_type,
      trained_params=variables["params"],
    )
    assert_whole_blocks(got, 4)
    measured = (
      masks_lib.direct_sparsity(got)
      if pruning_type == "direct"
      else sparsejax.effective_sparsity(net, got)
    )
    assert measured >= 0.95
  assert "block/8x8/mean" in sparsejax.PRUNERS and "acdc" in dynamic.METHODS


def test_a_rigl_update_step_applies_the_gradient_it_grows_by(mnist_like):
  """Closed form, plain SGD (no momentum, no decay): at a RigL update step t the new
  params are m' m (w - lr g), with g the dense gradient at the params *before* the
  update, m' the masks RigL grows by |g| and m the old masks (one forward and backward
  pass per step; grown weights stay 0 through the step, as RigL's code grows with zeros
  after it), in jit and between steps alike; the gradient after the drop gives other
  params."""
  model, variables, masks = setup(0.2)
  cfg = configs.get_config(
    "lenet300100", batch_size=32, train_steps=24, momentum=0.0, weight_decay=0.0
  )
  key, t = jax.random.key(3), 3
  updater = dynamic.RigL(end=16, every=3)
  assert updater.is_update_step(t)
  spec = data.get_spec("mnist")
  images, labels = mnist_like[0]
  batch = {"image": jnp.asarray(images[:32]), "label": jnp.asarray(labels[:32])}
  state = training.create_train_state(
    model, key, (28, 28, 1), cfg, masks=masks, params=variables["params"]
  ).replace(step=jnp.int32(t))
  lr = float(training.make_schedule(cfg)(t))

  g = training.forward_backward(state, batch, key, model=model, spec=spec)[1]
  new = updater.update(state.params, g, masks, jnp.int32(t), training.in_step.update_key(key, t))
  kept = masks_lib.map_masks(lambda n, o: n & o, new, masks)
  assert masks_lib.count(kept)[0] < masks_lib.count(new)[0]  # some weights are grown
  expected = masks_lib.map_masks(
    lambda m, w, gw: jnp.where(m, w - lr * gw, 0.0), kept, state.params, g
  )

  kernels = lambda params: masks_lib.mask_leaves(masks_lib.map_masks(lambda m, w: w, new, params))
  updates = training.MaskUpdates(
    updater, model=model, spec=spec, input_shape=(28, 28, 1), step_key=key
  )
  between, outputs = updates.update(state, batch, t)
  between, _ = training.apply_step(between, outputs)
  inside, _ = training.update_train_step(state, batch, key, model=model, spec=spec, updater=updater)
  for got in (between, inside):
    for a, b in zip(flat(got.masks), flat(new)):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(kernels(got.params), masks_lib.mask_leaves(expected)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  # The discriminating case: the gradient at the params after the drop differs there.
  dropped = state.replace(params=masks_lib.apply(state.params, new))
  g_after = training.forward_backward(dropped, batch, key, model=model, spec=spec)[1]
  other = masks_lib.map_masks(
    lambda m, w, gw: jnp.where(m, w - lr * gw, 0.0), kept, state.params, g_after
  )
  assert any(
    not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    for a, b in zip(kernels(inside.params), masks_lib.mask_leaves(other))
  )


def test_donated_steps_equal_plain_steps_and_consume_their_state(mnist_like):
  """``donate=True`` (what training.train's loop runs) computes the plain step bit for
  bit, on a fixed-mask step and on an in-jit RigL update step, and deletes the state
  passed in; training.train copies its first state, so the caller's params and masks
  outlive the run."""
  model, variables, masks = setup(0.2)
  cfg = configs.get_config("lenet300100", batch_size=32, train_steps=24)
  key, spec = jax.random.key(3), data.get_spec("mnist")
  images, labels = mnist_like[0]
  batch = {"image": jnp.asarray(images[:32]), "label": jnp.asarray(labels[:32])}
  state = training.create_train_state(
    model, key, (28, 28, 1), cfg, masks=masks, params=variables["params"]
  ).replace(step=jnp.int32(3))
  updater = dynamic.RigL(end=16, every=3)
  assert updater.is_update_step(3)
  steps = {
    "fixed mask": lambda s, donate: training.train_step(
      s, batch, key, model=model, spec=spec, donate=donate
    ),
    "in jit": lambda s, donate: training.update_train_step(
      s, batch, key, model=model, spec=spec, updater=updater, donate=donate
    ),
  }
  for name, step in steps.items():
    plain, plain_metrics = step(state, False)
    owned = jax.tree.map(jnp.copy, state)
    donated, donated_metrics = step(owned, True)
    assert all(x.is_deleted() for x in jax.tree.leaves(owned.params)), name
    assert not any(x.is_deleted() for x in jax.tree.leaves(state)), name
    for a, b in zip(_leaves((plain, plain_metrics)), _leaves((donated, donated_metrics))):
      np.testing.assert_array_equal(a, b, err_msg=name)

  for step in steps.values():
    with pytest.raises(ValueError, match="donate='yes' must be True or False"):
      step(state, "yes")
  # Copies by JAX, not NumPy views: a buffer NumPy views is never donated.
  kept = jax.tree.map(jnp.copy, (variables, masks))
  _train(mnist_like, dynamic.RigL(end=16, every=3), masks, variables, update_in_jit=True)
  _train(mnist_like, None, masks, variables)
  assert not any(x.is_deleted() for x in jax.tree.leaves((variables, masks)))
  for a, b in zip(_leaves(kept), _leaves((variables, masks))):
    np.testing.assert_array_equal(a, b)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]
