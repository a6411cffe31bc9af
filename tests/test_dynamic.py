"""Moving masks: gradual magnitude pruning, SET, RigL and STE against closed forms and
brute-force references, inside the library's training loop."""

import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import data, dynamic, effective, pruning, quotas, training
from sparsejax import masks as masks_lib
from tests import test_pruning as TP
from tests.test_training import TinyMLP, _batch, mnist_like, numpy_mask, numpy_params, tiny_config  # noqa: F401


def params_and_masks(density=1.0, seed=0):
  params = numpy_params(TinyMLP(), (28, 28, 1), seed)
  masks = dense_mask(TinyMLP()) if density == 1.0 else numpy_mask(params, density, seed)
  return masks_lib.apply(params, masks), masks


def dense_mask(model, input_shape=(28, 28, 1)):
  """The dense mask of ``model`` (its traced prunable set)."""
  return sparsejax.trace(model, input_shape).ones()


def flat(tree):
  return [np.asarray(x).reshape(-1) for x in masks_lib.mask_leaves(tree)]


# ------------------------------------------------------------------ GMP


def test_gmp_schedule_is_the_cubic_closed_form_and_ends_at_the_target():
  gmp = dynamic.GradualMagnitude(0.9, start=100, end=700, every=100, initial_sparsity=0.2)
  params, masks = params_and_masks()
  total = masks_lib.count(masks)[1]
  steps = [t for t in range(1000) if gmp.is_update_step(t)]
  assert steps == [100, 200, 300, 400, 500, 600, 700]
  previous = masks
  for t in steps:
    want = 0.9 + (0.2 - 0.9) * (1 - (t - 100) / 600) ** 3
    assert float(gmp.sparsity(t)) == pytest.approx(want, abs=1e-6)
    masks = gmp.update(params, None, masks, jnp.int32(t), jax.random.key(0))
    assert masks_lib.count(masks)[0] == round((1 - float(gmp.sparsity(t))) * total)
    for new, old in zip(flat(masks), flat(previous)):  # pruned weights never return
      assert not np.any(new & ~old)
    previous = masks
  assert masks_lib.count(masks)[0] == round(0.1 * total)
  # The kept weights are the largest |w| among those kept before (global ranking).
  w = np.concatenate([np.abs(x) for x in flat(masks_lib.map_masks(lambda m, p: p, masks, params))])
  keep = np.concatenate(flat(masks))
  assert w[keep].min() >= w[~keep].max()


def test_gmp_with_a_quota_keeps_the_quota_counts():
  gmp = dynamic.GradualMagnitude(0.8, start=0, end=0, quota="igq")
  params, masks = params_and_masks()
  out = gmp.update(params, None, masks, jnp.int32(0), jax.random.key(0))
  shapes = tuple(m.shape for m in masks_lib.mask_leaves(masks))
  want = np.asarray(quotas.layer_kept_counts("igq", 0.2, shapes))
  assert [int(m.sum()) for m in flat(out)] == want.tolist()


def test_gmp_effective_target_equals_the_brute_force_scan():
  model, _, input_shape = TP.small("mlp")
  masks = TP.dense("mlp")
  params = TP.random_scores(masks, 3)  # stands in for trained weights
  gmp = dynamic.GradualMagnitude(0.7, start=0, end=4, every=2, target="effective")
  for t in (0, 2, 4):
    s_t = float(gmp.sparsity(t))
    new = gmp.update_effective(params, None, masks, t, None, model=model, input_shape=input_shape)
    eff = effective.effective_masks(model, new, input_shape)
    assert masks_lib.direct_sparsity(eff) >= s_t - 1e-9
    ranking = pruning.rank_scores(gmp.scores(params, masks))
    want, _ = TP.brute_force(
      model, ranking, pruning.max_kept_for_sparsity(s_t, ranking.total), input_shape
    )
    assert masks_lib.count(new)[0] == want
    masks = new


# ------------------------------------------------------------- SET / RigL


def brute_force_rigl(w, g, m, fraction):
  """Per layer: drop the n smallest |w| among kept (ties by position), grow the n
  largest |g| among the others."""
  out = []
  for wl, gl, ml in zip(w, g, m):
    n = int(np.floor(np.float32(fraction) * np.float32(ml.sum())))
    kept_idx = np.nonzero(ml)[0]
    order = kept_idx[np.argsort(np.abs(wl[kept_idx]), kind="stable")]
    after = ml.copy()
    after[order[:n]] = False
    cand = np.nonzero(~after)[0]
    grow = cand[np.argsort(-np.abs(gl[cand]), kind="stable")[:n]]
    after[grow] = True
    out.append(after)
  return out


def test_rigl_regrows_the_largest_gradients_and_keeps_counts():
  params, masks = params_and_masks(0.3)
  rigl = dynamic.RigL(end=1000, every=100, drop_fraction=0.3)
  for t in (100, 400, 900):
    grads = numpy_params(TinyMLP(), (28, 28, 1), seed=t)  # a new gradient each time
    new = rigl.update(params, grads, masks, jnp.int32(t), jax.random.key(t))
    f = 0.3 / 2 * (1 + math.cos(math.pi * t / 1000))
    assert float(rigl.fraction(t)) == pytest.approx(f, rel=1e-6)
    w = flat(masks_lib.map_masks(lambda m, p: p, masks, params))
    g = flat(masks_lib.map_masks(lambda m, p: p, masks, grads))
    want = brute_force_rigl(w, g, flat(masks), float(rigl.fraction(t)))
    for got, exp, old in zip(flat(new), want, flat(masks)):
      np.testing.assert_array_equal(got, exp)
      assert got.sum() == old.sum()
    assert any((a != b).any() for a, b in zip(flat(new), flat(masks)))
    masks = new
    params = dynamic.apply_update(params, masks)
  assert not rigl.is_update_step(1000) and rigl.is_update_step(900)


def test_set_keeps_counts_and_grows_at_random():
  params, masks = params_and_masks(0.3)
  s = dynamic.SET(end=1000, every=100, drop_fraction=0.3)
  assert float(s.fraction(500)) == pytest.approx(0.3)
  new = s.update(params, None, masks, jnp.int32(100), jax.random.key(0))
  again = s.update(params, None, masks, jnp.int32(100), jax.random.key(0))
  other = s.update(params, None, masks, jnp.int32(100), jax.random.key(1))
  for a, b, old in zip(flat(new), flat(again), flat(masks)):
    np.testing.assert_array_equal(a, b)  # deterministic in (params, masks, step, key)
    assert a.sum() == old.sum()
  assert any((a != b).any() for a, b in zip(flat(new), flat(other)))


def test_active_regrowth_lands_no_weight_on_a_dead_unit():
  model, _, input_shape = TP.small("cnn")
  dense = TP.dense("cnn")
  params = TP.random_scores(dense, 1)
  masks = masks_lib.map_masks(
    lambda m: m, pruning.masks_at(pruning.rank_scores(TP.random_scores(dense, 2)), 60)
  )
  sweep = effective.connectivity_sweep(model, input_shape, units=False)
  grads = TP.random_scores(dense, 4)
  for cls in (dynamic.RigL, dynamic.SET):
    up = cls(end=100, every=10, drop_fraction=0.5, regrow="active")
    new = up.update(params, grads, masks, jnp.int32(10), jax.random.key(0), sweep=sweep)
    after_drop_potential = None
    grown = masks_lib.map_masks(lambda n, o: n & ~o, new, masks)
    eff = effective.effective_masks(model, new, input_shape)
    dead = masks_lib.count(masks_lib.map_masks(lambda g, e: g & ~e, grown, eff))[0]
    plain = cls(end=100, every=10, drop_fraction=0.5).update(
      params, grads, masks, jnp.int32(10), jax.random.key(0)
    )
    grown_plain = masks_lib.map_masks(lambda n, o: n & ~o, plain, masks)
    eff_plain = effective.effective_masks(model, plain, input_shape)
    dead_plain = masks_lib.count(masks_lib.map_masks(lambda g, e: g & ~e, grown_plain, eff_plain))[
      0
    ]
    assert dead <= dead_plain
    assert masks_lib.count(new)[0] == masks_lib.count(masks)[0]
    del after_drop_potential


@pytest.mark.parametrize("cls", [dynamic.SET, dynamic.RigL])
def test_effective_target_holds_the_active_count_and_never_revives_pruned(cls):
  model, shapes, input_shape = TP.small("cnn")
  params = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape), shapes)
  masks = pruning.masks_at(pruning.rank_scores(TP.random_scores(TP.dense("cnn"), 2)), 70)
  sweep = effective.connectivity_sweep(model, input_shape, units=False)
  total = masks_lib.count(masks)[1]
  up = cls(end=100, every=10, drop_fraction=0.5, regrow="active", target="effective", sparsity=0.7)
  target = pruning.max_kept_for_sparsity(0.7, total)
  for t in (10, 20, 30):
    grads = jax.tree.map(lambda s: jax.random.normal(jax.random.key(t), s.shape), shapes)
    grown = up.update(params, grads, masks, jnp.int32(t), jax.random.key(t), sweep=sweep)
    new = up.update_effective(
      params, grads, masks, t, jax.random.key(t), model=model, input_shape=input_shape, sweep=sweep
    )
    active = masks_lib.count(effective.effective_masks(model, new, input_shape))[0]
    assert active <= target  # effective sparsity at least the target
    for n, g in zip(flat(new), flat(grown)):  # only cut back from the drop/grow mask
      assert not np.any(n & ~g)
    # The cut is the search along (grown first, then |w|): the brute-force scan agrees.
    if masks_lib.count(effective.effective_masks(model, grown, input_shape))[0] > target:
      scores = masks_lib.map_masks(
        lambda n, o, w: jnp.where(n & ~o, 1e3, jnp.where(n, jnp.abs(w), -1.0)), grown, masks, params
      )
      want, _ = TP.brute_force(model, pruning.rank_scores(scores), target, input_shape)
      assert masks_lib.count(new)[0] == want
    masks = new
    params = dynamic.apply_update(params, masks)
  with pytest.raises(ValueError, match="needs sparsity="):
    cls(end=10, regrow="active", target="effective")
  with pytest.raises(ValueError, match="regrow='active'"):
    cls(end=10, target="effective", sparsity=0.5)


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="final_sparsity=1.0"):
    dynamic.GradualMagnitude(1.0, start=0, end=10)
  with pytest.raises(ValueError, match="end=5 must be at least start=10"):
    dynamic.GradualMagnitude(0.5, start=10, end=5)
  with pytest.raises(ValueError, match="every=0"):
    dynamic.RigL(end=10, every=0)
  with pytest.raises(ValueError, match="decay='linear'"):
    dynamic.SET(end=10, decay="linear")
  with pytest.raises(ValueError, match="regrow='dead'"):
    dynamic.RigL(end=10, regrow="dead")
  with pytest.raises(ValueError, match="grads="):
    params, masks = params_and_masks(0.5)
    dynamic.RigL(end=10).update(params, None, masks, jnp.int32(1), jax.random.key(0))


# ------------------------------------------------------------ protocol and registry


def test_every_builtin_is_an_updater_and_anything_else_is_refused():
  ups = {
    "gmp": dynamic.GradualMagnitude(0.9, start=0, end=10),
    "set": dynamic.SET(end=10),
    "rigl": dynamic.RigL(end=10, regrow="active"),
    "ste": dynamic.STE(0.9),
  }
  for u in ups.values():
    assert isinstance(u, dynamic.Updater) and dynamic.check_updater(u) is u
  assert {k for k, u in ups.items() if u.needs_grads} == {"rigl"}
  assert {k for k, u in ups.items() if u.straight_through} == {"ste"}
  assert {k for k, u in ups.items() if u.needs_sweep} == {"rigl"}  # regrow='active'
  assert {u.target for u in ups.values()} == {"direct"}
  with pytest.raises(ValueError, match="lacks is_update_step, update, update_effective"):
    dynamic.check_updater(object())
  with pytest.raises(ValueError, match="has no effective target"):
    ups["ste"].update_effective(None, None, None, 0, None, model=None, input_shape=None)


def test_registry_builds_the_methods_from_plain_settings():
  assert list(dynamic.METHODS)[:4] == ["gmp", "set", "rigl", "ste"]
  settings = dict(
    sparsity=0.9,
    start=10,
    end=90,
    every=5,
    quota="erk",
    target="direct",
    drop_fraction=0.2,
    initial_sparsity=0.1,
  )
  make = lambda name, **kw: dynamic.get_method(name).make(**{**settings, **kw})
  assert make("gmp") == dynamic.GradualMagnitude(
    0.9, start=10, end=90, every=5, initial_sparsity=0.1, quota="erk"
  )
  assert make("gmp", target="effective").target == "effective"
  # SET and RigL update from step 0 (their drop fraction decays over [0, end]).
  assert make("rigl") == dynamic.RigL(end=90, every=5, drop_fraction=0.2)
  assert make("set", target="effective") == dynamic.SET(
    end=90, every=5, drop_fraction=0.2, regrow="active", target="effective", sparsity=0.9
  )
  assert make("ste") == dynamic.STE(0.9, every=5, quota="erk")
  assert dynamic.get_method("rigl").make(end=50) == dynamic.RigL(end=50)  # defaults
  assert [dynamic.get_method(n).initial for n in ("gmp", "set", "rigl", "ste")] == [
    "dense",
    "random",
    "random",
    "dense",
  ]
  with pytest.raises(ValueError, match="method='rigl2' is not a known dynamic method; allowed"):
    dynamic.get_method("rigl2")
  with pytest.raises(ValueError, match="target='effective' is not available for ste"):
    make("ste", target="effective")
  with pytest.raises(ValueError, match=r"settings \['decay'\] are not known"):
    make("rigl", decay="linear")
  with pytest.raises(ValueError, match="already registered"):
    dynamic.register_method(dynamic.METHODS["rigl"])
  with pytest.raises(ValueError, match="initial='ones' is not allowed"):
    dynamic.Method("x", lambda **kw: None, (), initial="ones")
  with pytest.raises(ValueError, match="settings \\['lr'\\] are not known"):
    dynamic.Method("x", lambda **kw: None, ("lr",))


def test_docstring_examples_run():
  import doctest

  result = doctest.testmod(dynamic, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0, result
  assert "rigl/fast" not in dynamic.METHODS


def test_readme_dynamic_example_runs_in_a_plain_user_loop():
  """The README's RigL-in-your-own-loop example, as a user would paste it."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  readme = (repo / "README.md").read_text()
  section = readme.split("### Masks that move during training, in your own loop", 1)[1]
  code = section.split("```python", 1)[1].split("```", 1)[0]
  assert "sparsejax.with_masks" in code and "sparsejax.optim.replace_masks" in code
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    env={**os.environ, "PYTHONPATH": str(repo)},
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "kept 192 of 1920 weights" in out.stdout  # RigL holds the budget


# ------------------------------------------------------------ in training


UPDATERS = {
  "gmp": lambda: dynamic.GradualMagnitude(0.9, start=4, end=16, every=4),
  "set": lambda: dynamic.SET(end=20, every=4),
  "rigl": lambda: dynamic.RigL(end=20, every=4),
  "ste": lambda: dynamic.STE(0.9, every=4),
}


@pytest.mark.parametrize("name", sorted(UPDATERS))
def test_pruned_weights_are_zero_after_every_step(name, mnist_like):
  (images, labels), _ = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=24)
  params = numpy_params(model, (28, 28, 1))
  start = dense_mask(model) if name == "gmp" else numpy_mask(params, 0.1)
  updater = UPDATERS[name]()
  state = training.create_train_state(
    model,
    jax.random.key(0),
    (28, 28, 1),
    cfg,
    masks=start,
    params=params,
    straight_through=updater.straight_through,
  )
  key = jax.random.key(1)
  updates = training.MaskUpdates(
    updater,
    model=model,
    spec="mnist" and data.get_spec("mnist"),
    input_shape=(28, 28, 1),
    step_key=key,
    track_effective=True,
  )
  kept = None
  for step in range(24):
    before = state.masks
    if updater.is_update_step(step):
      state = updates(state, _batch(images, labels, 32, step), step)
    elif kept is not None:  # masks only move at update steps
      assert all(np.array_equal(a, b) for a, b in zip(flat(before), flat(state.masks)))
    state, _ = training.train_step(
      state,
      _batch(images, labels, 32, step),
      key,
      model=model,
      spec=data.get_spec("mnist"),
    )
    kept = masks_lib.count(state.masks)[0]
    forward = (
      masks_lib.apply(state.params, state.masks) if updater.straight_through else state.params
    )
    for w, m in zip(
      flat(masks_lib.map_masks(lambda m, p: p, state.masks, forward)), flat(state.masks)
    ):
      assert np.all(w[~m] == 0.0)
  assert [r["step"] for r in updates.records] == [s for s in range(24) if updater.is_update_step(s)]
  for r in updates.records:
    assert r["dead_kept"] >= 0 and r["effective_compression"] >= r["direct_compression"] - 1e-9
  if name in ("set", "rigl"):
    assert len({r["kept"] for r in updates.records}) == 1
    assert all(r["grown"] == r["dropped"] for r in updates.records)
  if name == "gmp":
    assert updates.records[-1]["direct_compression"] == pytest.approx(10, rel=0.01)


def test_train_with_an_updater_resumes_to_the_same_masks(mnist_like, tmp_path):
  train_data, test_data = mnist_like
  model, cfg = TinyMLP(), tiny_config(train_steps=20)
  params = numpy_params(model, (28, 28, 1))
  kw = dict(
    masks=numpy_mask(params, 0.2),
    params=params,
    eval_every=10,
    log_every=10,
    checkpoint_every=6,
    updater=dynamic.RigL(end=20, every=4),
    track_effective=True,
  )
  full = training.train(model, "mnist", cfg, train_data, test_data, **kw)
  training.train(
    model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path), num_steps=12, **kw
  )
  resumed = training.train(model, "mnist", cfg, train_data, test_data, workdir=str(tmp_path), **kw)
  assert resumed.start_step == 12
  assert [r["step"] for r in resumed.mask_updates] == [4, 8, 12, 16]
  assert resumed.mask_updates == full.mask_updates
  for a, b in zip(flat(full.state.masks), flat(resumed.state.masks)):
    np.testing.assert_array_equal(a, b)
  jax.tree.map(np.testing.assert_array_equal, full.state.params, resumed.state.params)


# ------------------------------------------------------------ experiments


def test_prune_train_builds_the_updaters_it_always_built():
  """make_updater reads the registry; the updaters (hence the masks) are those of the
  former name chain."""
  from experiments import configs, prune_train

  load = lambda *fields: configs.load(
    "lenet300100", ["train_steps=1000", "update_every=50", *fields]
  )
  cases = {
    ("gmp", "direct"): dynamic.GradualMagnitude(0.9, start=250, end=750, every=50),
    ("gmp", "effective"): dynamic.GradualMagnitude(
      0.9, start=250, end=750, every=50, target="effective"
    ),
    ("set", "direct"): dynamic.SET(end=750, every=50, drop_fraction=0.3),
    ("rigl", "effective"): dynamic.RigL(
      end=750, every=50, drop_fraction=0.3, regrow="active", target="effective", sparsity=0.9
    ),
    ("ste", "direct"): dynamic.STE(0.9, every=50),
  }
  for (pruner, ptype), want in cases.items():
    config = load(f"pruner={pruner}", f"pruning_type={ptype}")
    assert prune_train.make_updater(config, 0.9) == want, (pruner, ptype)
  with pytest.raises(ValueError, match="--config.update_target='effective' is not available"):
    prune_train.make_updater(load("pruner=ste", "pruning_type=effective"), 0.9)


@pytest.mark.slow
def test_a_registered_method_runs_in_prune_train_by_name(tmp_path):
  """A new dynamic method is one registration: prune_train and its checks find it."""
  from experiments import configs, datasource, prune_train, run_config

  method = dynamic.register_method(
    dynamic.Method(
      "toy_gmp",
      lambda *, sparsity, end: dynamic.GradualMagnitude(sparsity, start=0, end=end, every=2),
      ("sparsity", "end"),
      initial="dense",
      targets=("direct",),
    )
  )
  try:
    config = configs.load(
      "lenet300100",
      [
        "pruner=toy_gmp",
        "compression=10",
        "train_steps=8",
        "eval_every=8",
        "log_every=8",
        "checkpoint_every=8",
        "update_end=0.5",
      ],
    )
    assert run_config.check_pruner("toy_gmp") is None and "toy_gmp" in run_config.pruner_names()
    r = prune_train.run(
      config,
      out_dir=str(tmp_path),
      source=datasource.DataSource(synthetic=True, num_examples=256),
    )
    assert r["status"] == "ok"
    assert [u["step"] for u in r["mask_updates"]] == [0, 2, 4]
    assert r["direct_compression"] == pytest.approx(10, rel=1e-3)
  finally:
    del dynamic.METHODS[method.name]


@pytest.mark.slow
def test_prune_train_moving_masks_record_history_and_plot(tmp_path):
  from experiments import configs, datasource, grid, plot, prune_train

  source = datasource.DataSource(synthetic=True, num_examples=256)
  tiny = [
    "train_steps=40",
    "eval_every=20",
    "log_every=20",
    "update_every=10",
    "checkpoint_every=20",
  ]
  out = tmp_path / "results" / "runs"
  results = {}
  for pruner, ptype in (
    ("gmp", "direct"),
    ("gmp", "effective"),
    ("rigl", "direct"),
    ("set", "effective"),
    ("ste", "direct"),
  ):
    config = configs.load(
      "lenet300100", tiny + [f"pruner={pruner}", "compression=20", f"pruning_type={ptype}"]
    )
    results[pruner, ptype] = r = prune_train.run(config, out_dir=str(out), source=source)
    assert r["status"] == "ok", (pruner, ptype)
    ups = r["mask_updates"]
    assert ups and all({"effective_compression", "dead_kept", "grown_dead"} <= set(u) for u in ups)
  gmp = results["gmp", "direct"]
  assert [u["step"] for u in gmp["mask_updates"]] == [10, 20, 30]
  assert gmp["direct_compression"] == pytest.approx(20, rel=1e-3)
  assert results["gmp", "effective"]["effective_compression"] >= 20 * (1 - 1e-9)
  rigl = results["rigl", "direct"]["mask_updates"]
  assert len({u["kept"] for u in rigl}) == 1  # a fixed budget that moves
  assert all(u["grown_dead"] == 0 for u in results["set", "effective"]["mask_updates"])
  assert results["ste", "direct"]["direct_compression"] == pytest.approx(20, rel=1e-3)
  with pytest.raises(ValueError, match="update_target='effective' is not available for ste"):
    prune_train.run(
      configs.load(
        "lenet300100", tiny + ["pruner=ste", "compression=20", "pruning_type=effective"]
      ),
      out_dir=str(out),
      source=source,
    )
  assert grid.grid(["lenet300100"], ["gmp", "rigl"], [10.0], ["direct"], [0])[0]["pruner"] == "gmp"
  written = plot.make_all(str(tmp_path / "results"), str(tmp_path / "figs"), None, 40, 96000)
  for name in ("accuracy_dynamic_lenet300100_t40.png", "dead_weights_lenet300100_t40.png"):
    assert (tmp_path / "figs" / name).read_bytes()[:4] == b"\x89PNG"
  assert "gmp" in plot.dynamic_table(plot.load_runs(str(tmp_path / "results")))
  del written
