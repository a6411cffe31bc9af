"""Tests for sparsejax.training and experiments.configs (tiny networks, synthetic data)."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from experiments import configs
from sparsejax import data, models, training
from sparsejax import masks as masks_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyMLP(nn.Module):
  """Dense 32 -> batch norm -> ReLU -> Dense classes: prunable kernels and batch stats."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(32, name="dense_0")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm_0")(x)
    x = nn.relu(x)
    return nn.Dense(self.num_classes, name="dense_1")(x)


class TinyConv(nn.Module):
  """Conv 3x3 (4) -> batch norm -> ReLU -> avg pool 4 -> Dense classes."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv_0")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm_0")(x)
    x = nn.avg_pool(nn.relu(x), (4, 4), (4, 4))
    return nn.Dense(self.num_classes, name="dense_1")(x.reshape(x.shape[0], -1))


def kernel_paths(params) -> frozenset:
  """The prunable set of this file's models (Flax Dense and Conv layers): their 'kernel'
  leaves' '/'-joined paths. A test knows its own model;
  test_kernel_paths_are_the_traced_prunable_set checks this against sparsejax.trace."""
  return frozenset(
    masks_lib.path_str(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(params)
    if masks_lib.path_str(p[-1:]) == "kernel"
  )


def numpy_params(model, input_shape, seed=0):
  """He-normal kernels, zero biases, unit scales, from numpy: cheaper than compiling
  JAX's random initializers."""
  shapes = jax.eval_shape(
    lambda k, x: model.init(k, x, train=False), jax.random.key(0), jnp.zeros((1,) + input_shape)
  )["params"]
  rng = np.random.default_rng(seed)
  prunable = kernel_paths(shapes)

  def init(path, s):
    if masks_lib.path_str(path) in prunable:
      fan_in = int(np.prod(s.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), s.shape), jnp.float32)
    name = masks_lib.path_str(path[-1:])
    return jnp.ones(s.shape, jnp.float32) if name == "scale" else jnp.zeros(s.shape, jnp.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


def numpy_mask(params, density, seed=0):
  """Bernoulli(density) mask at the prunable kernels, None elsewhere."""
  rng = np.random.default_rng(seed)
  return masks_lib.map_prunable(
    lambda w: jnp.asarray(rng.random(w.shape) < density), params, prunable=kernel_paths(params)
  )


def tiny_config(**overrides) -> configs.TrainConfig:
  fields = dict(batch_size=32, train_steps=40)
  fields.update(overrides)
  return configs.get_config("lenet300100", **fields)


@pytest.fixture(scope="module")
def mnist_like():
  return data.synthetic_split("mnist", "train", 512), data.synthetic_split("mnist", "test", 200)


def _batch(images, labels, batch_size, step, seed=0):
  idx = data.batch_indices(len(images), batch_size, seed, step)
  return {"image": jnp.asarray(images[idx]), "label": jnp.asarray(labels[idx])}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


# ------------------------------------------------------------------ configs


def test_config_registry_matches_paper():
  # the paper's five, and the zoo's transformers (issue 25; tests/test_lm_training.py)
  assert set(configs.CONFIGS) == {"lenet300100", "lenet5", "vgg16", "vgg19", "resnet18"} | {
    "vit",
    "gpt",
  }
  expected = {  # dataset, batch, steps, lr, keras l2, boundary steps, snip batch
    "lenet300100": ("mnist", 100, 96_000, 0.1, 5e-4, (25_000, 50_000, 75_000), 100),
    "lenet5": ("cifar10", 128, 120_000, 0.1, 5e-4, (30_000, 60_000, 90_000), 128),
    "vgg16": ("cifar10", 128, 62_500, 0.1, 1e-4, (31_250, 46_875), 128),
    "vgg19": ("cifar100", 128, 62_500, 0.1, 1e-4, (31_250, 46_875), 1280),
    "resnet18": ("tiny_imagenet", 256, 78_200, 0.2, 1e-4, (39_100, 58_650), 2560),
  }
  for arch, (ds, bs, steps, lr, l2, bounds, snip) in expected.items():
    c = configs.get_config(arch)
    assert (c.dataset, c.batch_size, c.train_steps, c.learning_rate) == (ds, bs, steps, lr)
    assert (c.momentum, c.decay_factor, c.snip_batch_size) == (0.9, 0.1, snip)
    assert c.weight_decay == pytest.approx(2 * l2)
    assert c.boundary_steps() == bounds
    assert c.dataset in data.DATASETS and models.get_spec(arch).dataset == c.dataset
    hash(c)  # Static jit argument.


def test_config_overrides_scale_the_schedule_and_errors():
  c = configs.get_config("lenet300100", train_steps=960, batch_size=10)
  assert (c.train_steps, c.batch_size) == (960, 10)
  assert c.boundary_steps() == (250, 500, 750)
  assert configs.CONFIGS["lenet300100"].train_steps == 96_000  # Not mutated.
  assert configs.get_config("vgg16", decay_boundaries=[0.5]).decay_boundaries == (0.5,)
  with pytest.raises(ValueError, match="arch='lenet'.*allowed: lenet300100"):
    configs.get_config("lenet")
  with pytest.raises(ValueError, match=r"\['lr'\] are not TrainConfig fields"):
    configs.get_config("lenet5", lr=0.5)
  with pytest.raises(ValueError, match="batch_size=0"):
    configs.get_config("lenet5", batch_size=0)
  with pytest.raises(ValueError, match="decay_boundaries"):
    configs.get_config("lenet5", decay_boundaries=(0.75, 0.5))
  with pytest.raises(ValueError, match="momentum"):
    configs.get_config("lenet5", momentum=1.5)
  with pytest.raises(dataclasses.FrozenInstanceError):
    configs.CONFIGS["lenet5"].batch_size = 1


# ----------------------------------------------------------------- optimizer


def test_schedule_values_around_boundaries():
  sched = training.make_schedule(configs.get_config("lenet300100"))
  for step, lr in [
    (0, 0.1),
    (24_999, 0.1),
    (25_000, 0.01),
    (25_001, 0.01),
    (49_999, 0.01),
    (50_000, 1e-3),
    (74_999, 1e-3),
    (75_000, 1e-4),
    (95_999, 1e-4),
  ]:
    np.testing.assert_allclose(sched(step), lr, rtol=1e-6, err_msg=f"step {step}")
  sched = training.make_schedule(configs.get_config("resnet18", train_steps=780))
  for step, lr in [(389, 0.2), (390, 0.02), (584, 0.02), (585, 2e-3)]:
    np.testing.assert_allclose(sched(step), lr, rtol=1e-6, err_msg=f"step {step}")
  # Boundaries that round to one step compound: round(0.26 * 2) = round(0.52 * 2) = 1.
  sched = training.make_schedule(configs.get_config("lenet300100", train_steps=2))
  np.testing.assert_allclose([sched(0), sched(1), sched(2)], [0.1, 1e-3, 1e-4], rtol=1e-6)


def test_optimizer_decays_kernels_only_and_follows_schedule():
  cfg = configs.get_config(
    "lenet300100", train_steps=4, decay_boundaries=(0.25,), weight_decay=1e-3
  )
  params = {
    "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones(4)},
    "norm": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
  }
  # The prunable set (what L2 applies to) is the mask tree's leaves.
  prunable = {
    "dense": {"kernel": jnp.ones((3, 4), bool), "bias": None},
    "norm": {"scale": None, "bias": None},
  }
  assert training.decay_mask(params, prunable) == {
    "dense": {"kernel": True, "bias": False},
    "norm": {"scale": False, "bias": False},
  }
  tx = training.make_optimizer(cfg, prunable)
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt_state = tx.init(params)
  u1, opt_state = tx.update(zeros, opt_state, params)
  u2, _ = tx.update(zeros, opt_state, params)
  decay = 1e-3 * 2.0  # weight_decay * w enters the gradient of kernels only.
  np.testing.assert_allclose(u1["dense"]["kernel"], -0.1 * decay, rtol=1e-6)
  # Step 1 is past the boundary (lr 0.01); the momentum trace is 0.9 * g1 + g2.
  np.testing.assert_allclose(u2["dense"]["kernel"], -0.01 * 1.9 * decay, rtol=1e-6)
  for u in (u1, u2):
    for leaf in (u["dense"]["bias"], u["norm"]["scale"], u["norm"]["bias"]):
      np.testing.assert_array_equal(leaf, 0.0)


class ProjNet(nn.Module):
  """A user model whose weight is a bare ``self.param('proj', ...)`` used in ``x @ proj``:
  prunable (it is a linear op's weight) although it is not named 'kernel'."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    proj = self.param("proj", nn.initializers.lecun_normal(), (x.shape[-1], 10))
    return x @ proj + self.param("bias", nn.initializers.zeros, (10,))


@pytest.mark.parametrize("masked", [False, True])
def test_weight_decay_applies_to_the_prunable_set_whatever_its_name(masked):
  """Decay follows the one prunable rule: the mask tree's leaves, or (no masks) the
  weights the traced program uses in a linear op, here a user's `x @ proj`."""
  cfg = tiny_config(weight_decay=1e-3)
  model = ProjNet()
  params = {
    "proj": jnp.asarray(np.random.default_rng(0).normal(size=(784, 10)), jnp.float32),
    "bias": jnp.ones(10),
  }
  masks = {"proj": jnp.ones((784, 10), bool), "bias": None} if masked else None
  state = training.create_train_state(
    model, jax.random.key(0), (28, 28, 1), cfg, masks=masks, params=params
  )
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  updates, _ = state.tx.update(zeros, state.opt_state, state.params)
  # First step: the momentum trace is the decay term itself, -lr * wd * w.
  np.testing.assert_allclose(updates["proj"], -0.1 * 1e-3 * params["proj"], rtol=1e-6)
  np.testing.assert_array_equal(updates["bias"], 0.0)


# ----------------------------------------------------------------- masks


def _kernels(tree):
  prunable = kernel_paths(tree)
  return [
    np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
    if masks_lib.path_str(p) in prunable
  ]


@pytest.mark.parametrize(
  "model,input_shape",
  [
    (TinyMLP(), (28, 28, 1)),
    (TinyConv(), (32, 32, 3)),
    (models.create("lenet300100"), (28, 28, 1)),
  ],
  ids=["tiny_mlp", "tiny_conv", "lenet300100"],
)
def test_kernel_paths_are_the_traced_prunable_set(model, input_shape):
  params = numpy_params(model, input_shape)
  traced = sparsejax.trace(model, input_shape)
  assert kernel_paths(params) == frozenset(traced.prunable_paths)
  assert masks_lib.paths(numpy_mask(params, 0.5)) == masks_lib.paths(traced.ones())


def test_masks_hold_exactly_after_many_steps(mnist_like):
  (images, labels), _ = mnist_like
  model, cfg = models.create("lenet300100"), tiny_config(train_steps=50)
  init = numpy_params(model, (28, 28, 1))
  mask = numpy_mask(init, 0.2)
  masks_lib.validate(mask, init)
  state = training.create_train_state(
    model, jax.random.key(0), (28, 28, 1), cfg, masks=mask, params=init
  )
  kernels0 = _kernels(state.params)
  mask_np = [np.asarray(m) for m in masks_lib.mask_leaves(mask)]
  assert all(np.all(w[~m] == 0.0) for w, m in zip(kernels0, mask_np))
  assert all(np.array_equal(w[m], w1[m]) for w, w1, m in zip(kernels0, _kernels(init), mask_np))
  key = jax.random.key(2)
  for step in range(50):
    state, metrics = training.train_step(
      state,
      _batch(images, labels, 32, step),
      key,
      model=model,
      spec=models.get_spec("lenet300100"),
      config=cfg,
    )
  assert int(state.step) == 50 and np.isfinite(float(metrics["loss"]))
  # WithMasksState(masks, chain(decay, sgd)) -> sgd's (TraceState, ...).
  trace = state.opt_state.inner_state[1][0].trace
  for w0, w, t, m in zip(kernels0, _kernels(state.params), _kernels(trace), mask_np):
    assert np.all(w[~m] == 0.0) and np.all(t[~m] == 0.0)
    assert np.mean(w[m] != w0[m]) > 0.99  # Kept weights train.


def test_momentum_cannot_revive_pruned_weights(mnist_like):
  """A momentum buffer that is nonzero at pruned weights (e.g. carried over from dense
  training) still leaves them at exactly 0: the updates are masked too."""
  (images, labels), _ = mnist_like
  model, cfg = TinyMLP(), tiny_config()
  params = numpy_params(model, (28, 28, 1))
  mask = numpy_mask(params, 0.3)
  state = training.create_train_state(
    model, jax.random.key(0), (28, 28, 1), cfg, masks=mask, params=params
  )
  decay_state, (trace_state, *rest) = state.opt_state.inner_state
  poisoned = trace_state._replace(trace=jax.tree.map(jnp.ones_like, trace_state.trace))
  state = state.replace(
    opt_state=state.opt_state._replace(inner_state=(decay_state, (poisoned, *rest)))
  )
  mask_np = [np.asarray(m) for m in masks_lib.mask_leaves(mask)]
  for step in range(5):
    state, _ = training.train_step(
      state,
      _batch(images, labels, 32, step),
      jax.random.key(3),
      model=model,
      spec="mnist",
      config=cfg,
    )
    assert all(np.all(w[~m] == 0.0) for w, m in zip(_kernels(state.params), mask_np))


def test_conv_kernels_masked_with_flip_shift_augmentation():
  images, labels = data.synthetic_split("cifar10", "train", 64)
  model = TinyConv()
  cfg = configs.get_config("lenet5", batch_size=16, train_steps=3)
  params = numpy_params(model, (32, 32, 3))
  mask = numpy_mask(params, 0.3)
  state = training.create_train_state(
    model, jax.random.key(0), (32, 32, 3), cfg, masks=mask, params=params
  )
  for step in range(3):
    state, _ = training.train_step(
      state,
      _batch(images, labels, 16, step),
      jax.random.key(0),
      model=model,
      spec="cifar10",
      config=cfg,
    )
  conv = np.asarray(state.params["conv_0"]["kernel"])
  m = np.asarray(mask["conv_0"]["kernel"])
  assert conv.ndim == 4 and np.all(conv[~m] == 0.0)
  assert np.all(conv[m] != np.asarray(params["conv_0"]["kernel"])[m])


# ----------------------------------------------------------------- learning


def test_loss_decreases_and_accuracy_beats_chance(mnist_like):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=60)
  params = numpy_params(model, (28, 28, 1))
  state0 = training.create_train_state(model, jax.random.key(0), (28, 28, 1), cfg, params=params)
  loss0, acc0 = training.evaluate(state0, *test_data, model=model, spec="mnist")
  result = training.train(
    model,
    models.get_spec("lenet300100"),
    cfg,
    train_data,
    test_data,
    params=params,
    seed=0,
    eval_every=20,
    log_every=20,
  )
  assert [h["step"] for h in result.history] == [20, 40, 60]
  assert result.final_test_loss == result.history[-1]["test_loss"]
  assert result.final_test_loss < 0.5 * loss0
  assert result.final_test_accuracy > 0.8 and result.final_test_accuracy > acc0 + 0.3
  assert result.steps_per_second > 0 and result.wall_time > 0 and result.start_step == 0


def test_default_init_and_dense_training(mnist_like):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=4)
  result = training.train(model, None, cfg, train_data, test_data, seed=1)
  assert result.state.masks is None and int(result.state.step) == 4
  assert np.isfinite(result.final_test_loss)
  assert result.state.params["dense_0"]["kernel"].shape == (784, 32)


def test_evaluate_handles_padding(mnist_like):
  _, (images, labels) = mnist_like
  model, cfg = TinyMLP(), tiny_config()
  state = training.create_train_state(
    model, jax.random.key(0), (28, 28, 1), cfg, params=numpy_params(model, (28, 28, 1))
  )
  full = training.evaluate(state, images, labels, model=model, spec="mnist", batch_size=200)
  padded = training.evaluate(state, images, labels, model=model, spec="mnist", batch_size=64)
  np.testing.assert_allclose(padded, full, rtol=1e-5)
  x = data.preprocess(None, jnp.asarray(images), "mnist", train=False)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
  np.testing.assert_allclose(full[1], np.mean(np.argmax(logits, -1) == labels), rtol=1e-6)


# ----------------------------------------------------------------- progress


def test_progress_cadence_is_seconds_or_one_percent_and_speed_excludes_compilation():
  now = [0.0]
  p = training.Progress(0, 1000, log_seconds=30.0, log_every=500, clock=lambda: now[0])
  assert p.every_steps == 10  # 1% of the run, under log_every
  assert training.Progress(0, 100_000, log_seconds=30.0, log_every=500).every_steps == 500
  assert training.Progress(0, 300, log_seconds=30.0, log_every=500).every_steps == 3
  now[0] = 20.0  # the first step compiles for 20 s
  assert not p.step_done(1)
  assert "- steps/s" in p.line(1, 2.0, 0.1)  # nothing timed yet
  due = []
  for done in range(2, 31):
    now[0] += 0.5
    if done == 21:
      p.add_pause(7.0)  # an evaluation: not training time
      now[0] += 7.0
    due.append(p.step_done(done))
  assert [d for d, yes in zip(range(2, 31), due) if yes] == [10, 20, 30]
  line = p.line(30, 1.0, 0.5)
  assert p.rate == pytest.approx(29 / 14.5) and f"{p.rate:.1f} steps/s" in line
  assert line.startswith("step 30/1000: loss 1.0000, accuracy 0.5000")
  now[0] += 31.0  # slow steps: 30 seconds pass before the next 1%
  assert p.step_done(31)


def test_a_300_step_run_logs_progress_at_its_result_speed(mnist_like, caplog):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=300, batch_size=16)
  caplog.set_level(logging.INFO, logger="absl")
  result = training.train(
    model, "mnist", cfg, train_data, test_data, params=numpy_params(model, (28, 28, 1))
  )
  lines = [r.getMessage() for r in caplog.records if "steps/s" in r.getMessage()]
  assert len(lines) >= 100  # every 1% (3 steps), and every 30 s
  assert lines[-1].startswith("step 300/300: loss ")
  assert f", {result.steps_per_second:.1f} steps/s, ETA 0:00:00" in lines[-1]


def test_orbax_info_lines_are_hidden_unless_asked(mnist_like, tmp_path, caplog):
  import orbax.checkpoint as ocp

  orbax_dir = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__)))
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=4)
  kw = dict(params=numpy_params(model, (28, 28, 1)), checkpoint_every=2, eval_every=4)
  caplog.set_level(logging.INFO, logger="absl")
  orbax_info = lambda: [
    r for r in caplog.records if r.pathname.startswith(orbax_dir) and r.levelno < logging.WARNING
  ]
  training.train(model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path / "a"), **kw)
  assert not orbax_info()
  assert any(r.getMessage().startswith("Training TinyMLP") for r in caplog.records)
  assert not logging.getLogger("absl").filters  # removed when train returns
  caplog.clear()
  training.train(
    model,
    "mnist",
    cfg,
    train_data,
    test_data,
    workdir=str(tmp_path / "b"),
    verbose_checkpoints=True,
    **kw,
  )
  assert orbax_info()


# ----------------------------------------------------------------- resume


def test_resume_is_identical_to_an_uninterrupted_run(mnist_like, tmp_path):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=30)
  params = numpy_params(model, (28, 28, 1), seed=5)
  mask = numpy_mask(params, 0.5, seed=6)
  kwargs = dict(
    masks=mask,
    params=params,
    seed=3,
    eval_every=10,
    log_every=10,
    checkpoint_every=5,
    keep_checkpoints=2,
  )
  full = training.train(model, "mnist", cfg, train_data, test_data, **kwargs)

  first = training.train(
    model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path), num_steps=13, **kwargs
  )
  assert int(first.state.step) == 13 and first.start_step == 0
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [10, 13]
  resumed = training.train(
    model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path), **kwargs
  )
  assert resumed.start_step == 13 and int(resumed.state.step) == 30
  for name in ("params", "batch_stats", "opt_state"):
    for a, b in zip(_leaves(getattr(full.state, name)), _leaves(getattr(resumed.state, name))):
      np.testing.assert_array_equal(a, b)
  assert [h["step"] for h in resumed.history] == [10, 13, 20, 30]
  assert resumed.history[-1] == full.history[-1]

  # A finished run returns its result without training.
  again = training.train(
    model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path), **kwargs
  )
  assert again.start_step == 30 and again.final_test_loss == resumed.final_test_loss
  # A workdir of another run is refused rather than silently mixed.
  with pytest.raises(ValueError, match="different masks"):
    training.train(
      model,
      "mnist",
      cfg,
      train_data,
      test_data,
      workdir=str(tmp_path),
      **{**kwargs, "masks": numpy_mask(params, 0.5, seed=7)},
    )
  with pytest.raises(ValueError, match="different settings"):
    training.train(
      model,
      "mnist",
      tiny_config(train_steps=30, learning_rate=0.05),
      train_data,
      test_data,
      workdir=str(tmp_path),
      **kwargs,
    )


def test_train_validates_arguments(mnist_like):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config()
  with pytest.raises(ValueError, match="num_steps=41"):
    training.train(model, "mnist", cfg, train_data, test_data, num_steps=41)
  with pytest.raises(ValueError, match="dataset 'cifar10'"):
    training.train(model, "cifar10", cfg, train_data, test_data)
  with pytest.raises(ValueError, match="eval_every=0"):
    training.train(model, "mnist", cfg, train_data, test_data, eval_every=0)
  with pytest.raises(ValueError, match="spec=3"):
    training.train(model, 3, cfg, train_data, test_data)
  params = numpy_params(TinyMLP(num_classes=5), (28, 28, 1))
  with pytest.raises(ValueError, match="params do not match"):
    training.create_train_state(model, jax.random.key(0), (28, 28, 1), cfg, params=params)
  with pytest.raises(ValueError, match="masks"):
    bad = numpy_mask(numpy_params(model, (28, 28, 1)), 0.5)
    bad["dense_0"]["bias"] = jnp.ones(32, bool)
    training.create_train_state(
      model, jax.random.key(0), (28, 28, 1), cfg, masks=bad, params=numpy_params(model, (28, 28, 1))
    )


# ----------------------------------------------------------------- data parallel

_CHILD = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from experiments import configs
    from sparsejax import data, training
    from tests.test_training import TinyMLP, numpy_mask, numpy_params

    assert len(jax.local_devices()) == 2, jax.local_devices()
    model = TinyMLP()
    train_data = data.synthetic_split("mnist", "train", 256)
    test_data = data.synthetic_split("mnist", "test", 101)
    cfg = configs.get_config("lenet300100", batch_size=32, train_steps=8)
    params = numpy_params(model, (28, 28, 1))
    mask = numpy_mask(params, 0.3)
    out = {}
    for n in (2, 1):
      r = training.train(model, "mnist", cfg, train_data, test_data, masks=mask,
                         params=params, devices=jax.local_devices()[:n], eval_every=4)
      leaf = r.state.params["dense_0"]["kernel"]
      assert leaf.sharding.mesh.size == n and leaf.sharding.is_fully_replicated
      for name, tree in (("params", r.state.params), ("batch_stats", r.state.batch_stats)):
        for i, x in enumerate(jax.tree.leaves(jax.device_get(tree))):
          out[f"{n}/{name}{i}"] = np.asarray(x)
      out[f"{n}/metrics"] = np.array([r.final_test_loss, r.final_test_accuracy])
    try:
      training.train(model, "mnist", configs.get_config("lenet300100", batch_size=33,
                     train_steps=2), train_data, test_data)
    except ValueError as err:
      assert "divisible by the number of devices (2)" in str(err), err
    else:
      raise AssertionError("batch 33 on 2 devices was accepted")
    np.savez(sys.argv[1], **out)
""")


def test_data_parallel_matches_one_device(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=2",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
  )
  out = tmp_path / "params.npz"
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, str(out)],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  with np.load(out) as arrays:
    two = {k[2:]: arrays[k] for k in arrays.files if k.startswith("2/")}
    one = {k[2:]: arrays[k] for k in arrays.files if k.startswith("1/")}
  assert set(two) == set(one) and len(two) == 9  # 6 params, 2 batch stats, metrics.
  for name in two:
    a, b = two[name], one[name]
    scale = float(np.max(np.abs(b)))
    assert np.max(np.abs(a - b)) <= 1e-5 * scale + 1e-6, name


# ------------------------------------------------- integrity and divergence


def _checkpointed_run(mnist_like, workdir, num_steps=None, **overrides):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=20)
  params = numpy_params(model, (28, 28, 1), seed=5)
  kwargs = dict(
    params=params,
    seed=3,
    eval_every=10,
    log_every=10,
    checkpoint_every=5,
    keep_checkpoints=3,
    workdir=str(workdir),
    num_steps=num_steps,
  )
  kwargs.update(overrides)
  return training.train(model, "mnist", cfg, train_data, test_data, **kwargs)


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def uninterrupted(mnist_like, tmp_path_factory):
  return _checkpointed_run(mnist_like, tmp_path_factory.mktemp("full"))


# Orbax logs its failed reads from background tasks as unraisable exceptions.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "damage", ["flip_bytes", "truncate", "delete_manifest", "delete_metadata", "empty_step_folder"]
)
def test_damaged_checkpoint_falls_back_to_the_previous_one(
  mnist_like, uninterrupted, tmp_path, damage, caplog
):
  _checkpointed_run(mnist_like, tmp_path, num_steps=15)
  step_dir = tmp_path / "15"
  if damage == "flip_bytes":
    # Bytes of the array data, not of a header: read back without any error.
    target = _largest_data_file(step_dir)
    payload = bytearray(target.read_bytes())
    for i in (100, len(payload) // 2, len(payload) - 100):
      payload[i] ^= 0xFF
    target.write_bytes(bytes(payload))
  elif damage == "truncate":
    target = _largest_data_file(step_dir)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  elif damage == "delete_metadata":
    (step_dir / "state" / "_METADATA").unlink()
  elif damage == "delete_manifest":
    (step_dir / "state" / "manifest.ocdbt").unlink()
  else:
    import shutil

    shutil.rmtree(step_dir)
    step_dir.mkdir()
  resumed = _checkpointed_run(mnist_like, tmp_path)
  assert resumed.start_step == 10
  assert "checkpoint at step 15 is unusable" in caplog.text
  assert [
    p.name.split("-")[0] for p in (tmp_path.parent / (tmp_path.name + "-corrupt")).iterdir()
  ] == ["15"]
  for a, b in zip(_leaves(uninterrupted.state.params), _leaves(resumed.state.params)):
    np.testing.assert_array_equal(a, b)


# Orbax logs its failed reads from background tasks as unraisable exceptions.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_intact_checkpoint_starts_fresh(mnist_like, uninterrupted, tmp_path):
  _checkpointed_run(mnist_like, tmp_path, num_steps=10)
  for step in (5, 10):
    (tmp_path / str(step) / "state" / "manifest.ocdbt").unlink()
  resumed = _checkpointed_run(mnist_like, tmp_path)
  assert resumed.start_step == 0
  for a, b in zip(_leaves(uninterrupted.state.params), _leaves(resumed.state.params)):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_cleanly_without_a_non_finite_checkpoint(mnist_like, tmp_path):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=20, learning_rate=1e30)
  params = numpy_params(model, (28, 28, 1), seed=5)
  with pytest.raises(training.DivergedError) as err:
    training.train(
      model,
      "mnist",
      cfg,
      train_data,
      test_data,
      params=params,
      workdir=str(tmp_path),
      checkpoint_every=1,
      log_every=10,
      eval_every=10,
    )
  step = err.value.step
  assert 1 <= step <= 20 and f"step {step}" in str(err.value)
  import orbax.checkpoint as ocp

  saved = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert all(s < step for s in saved)
  for s in saved:
    state = ocp.StandardCheckpointer().restore(tmp_path / str(s) / "state")
    assert all(
      np.all(np.isfinite(x))
      for x in jax.tree.leaves(state)
      if np.issubdtype(np.asarray(x).dtype, np.floating)
    ), s
