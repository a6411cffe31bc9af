"""Tests for sparsejax.structured: channel/neuron pruning as weight masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import compact, effective, errors, pruning, quotas, structured
from sparsejax import masks as masks_lib
from sparsejax.models import LeNet5, LeNet300100, ResNet18

SHAPE = (28, 28, 1)


@functools.cache
def lenet5():
  model = LeNet5(channels=(4, 6), hidden=(12, 8))
  return model, model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))


def test_l1_removes_the_smallest_filters_per_layer():
  model, v = lenet5()
  m = structured.prune(
    "channel/l1", key=jax.random.key(0), model=model, variables=v, fraction=0.5, input_shape=SHAPE
  )
  for i, size in enumerate((4, 6)):
    k = np.asarray(v["params"][f"conv_{i}"]["kernel"])
    norms = np.abs(k).reshape(-1, size).sum(0)
    want = np.sort(np.argsort(norms)[size // 2 :])
    kept = np.flatnonzero(np.asarray(m[f"conv_{i}"]["kernel"]).any((0, 1, 2)))
    np.testing.assert_array_equal(kept, want)
  # the filters and the readers' input slices of removed channels are masked, nothing else
  k1 = np.asarray(m["conv_1"]["kernel"])
  kept0 = np.asarray(m["conv_0"]["kernel"]).any((0, 1, 2))
  assert np.all(k1[:, :, ~kept0, :] == 0)
  kept1 = k1.any((0, 1, 2))
  d = np.asarray(m["dense_2"]["kernel"]).reshape(-1, 6, 12)
  assert np.all(d[:, ~kept1] == 0) and np.all(d[:, kept1])
  assert np.all(k1[:, :, kept0][..., kept1])


@pytest.mark.parametrize(
  "name,quota",
  [
    ("channel/l1", "uniform"),
    ("channel/random", "global"),
    ("neuron/magnitude", "uniform"),
    ("neuron/synflow", "global"),
  ],
)
def test_compacts_to_a_dense_smaller_network(name, quota):
  model, v = lenet5()
  m = structured.prune(
    name if quota == "uniform" else f"{name}/{quota}",
    key=jax.random.key(1),
    model=model,
    variables=v,
    fraction=0.5,
    input_shape=SHAPE,
  )
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=SHAPE, verify=True)
  assert all(bool(jnp.all(k)) for k in masks_lib.mask_leaves(new_m))  # dense
  kind = name.split("/")[0]
  sizes = [s.size for s in structured.spaces_of(model, v, kind)]
  new_sizes = [s.size for s in structured.spaces_of(new_model, new_v, kind)]
  if quota == "uniform":
    assert new_sizes == [n - round(0.5 * n) for n in sizes]
  else:
    assert sum(sizes) - sum(new_sizes) == round(0.5 * sum(sizes)) and min(new_sizes) >= 1
  # effective = direct for structured masks: the readers' slices are masked already
  assert effective.effective_compression(model, m, SHAPE) == pytest.approx(masks_lib.compression(m))


def test_neuron_magnitude_is_the_sum_over_in_and_out_weights():
  model = LeNet300100(hidden=(10, 6))
  v = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  sc = structured.channel_scores(
    "neuron/magnitude", key=jax.random.key(0), model=model, variables=v
  )
  p = v["params"]
  for i in range(2):
    want = np.abs(np.asarray(p[f"dense_{i}"]["kernel"])).sum(0) + np.abs(
      np.asarray(p[f"dense_{i + 1}"]["kernel"])
    ).sum(1)
    np.testing.assert_allclose(sc[f"dense_{i}"], want, rtol=1e-5)


def test_bn_scale_keeps_the_largest_scales_and_residual_streams_as_groups():
  model = ResNet18(num_classes=3, widths=(4, 4, 4, 4))
  v = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))
  v = jax.tree.map(lambda a: a, v)
  g = np.array([3.0, 0.1, 2.0, 0.2], np.float32)
  v["params"]["stage0_norm"]["scale"] = jnp.asarray(g)
  sc = structured.channel_scores(
    "channel/bn_scale", key=jax.random.key(0), model=model, variables=v
  )
  # stream 1 = the stem and both blocks' norm_2: 1 + 1 at init, plus the stem's
  np.testing.assert_allclose(sc["stream1"], g + 2.0)
  ranking = structured.rank("channel/bn_scale", "channel", "uniform", sc, model, v)
  keep = ranking.kept(round(0.5 * sum(ranking.sizes)))
  np.testing.assert_array_equal(keep["stream1"], [0, 2])
  m = structured.masks_for(model, v, keep)
  new_model, _, _ = compact.compact(model, v, m, input_shape=(8, 8, 3), verify=True)
  assert new_model.widths == (2, 2, 2, 2)


def test_the_quota_in_the_name_is_honoured():
  """structured.prune('neuron/l1/igq') uses IGQ (it once silently used uniform)."""
  model = LeNet300100(hidden=(40, 8))
  v = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  kw = dict(key=jax.random.key(0), model=model, variables=v, fraction=0.5)
  sc = structured.channel_scores("neuron/l1", key=kw["key"], model=model, variables=v)
  for quota in ("igq", "erk", "global"):
    m = structured.prune(f"neuron/l1/{quota}", **kw)
    again = structured.prune(f"neuron/l1/{quota}", quota=quota, **kw)  # may repeat it
    for a, b in zip(masks_lib.mask_leaves(m), masks_lib.mask_leaves(again), strict=True):
      np.testing.assert_array_equal(a, b)
    ranking = structured.rank(f"neuron/l1/{quota}", "neuron", quota, sc, model, v)
    removed = ranking.removed_counts(min(round(0.5 * sum(ranking.sizes)), ranking.steps))
    kept = [int(np.asarray(m[f"dense_{i}"]["kernel"]).any(0).sum()) for i in range(2)]
    assert kept == [n - r for n, r in zip(ranking.sizes, removed)], quota
  uniform = structured.prune("neuron/l1", **kw)
  kept = [int(np.asarray(uniform[f"dense_{i}"]["kernel"]).any(0).sum()) for i in range(2)]
  assert kept == [20, 4]
  igq = structured.prune("neuron/l1/igq", **kw)
  assert [int(np.asarray(igq[f"dense_{i}"]["kernel"]).any(0).sum()) for i in range(2)] != kept


def test_bad_input():
  model, v = lenet5()
  kw = dict(key=jax.random.key(0), model=model, variables=v, input_shape=SHAPE)
  with pytest.raises(ValueError, match="name="):
    structured.prune("channel/l2", fraction=0.5, **kw)
  with pytest.raises(ValueError, match="fraction="):
    structured.prune("channel/l1", fraction=1.0, **kw)
  with pytest.raises(ValueError, match="quota='uniform_plus' contradicts.*'uniform'"):
    structured.prune("channel/l1", fraction=0.5, quota="uniform_plus", **kw)
  with pytest.raises(ValueError, match="batches="):
    structured.prune("channel/snip", fraction=0.5, **kw)
  mlp = LeNet300100(hidden=(10, 6))
  vm = mlp.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  with pytest.raises(ValueError, match="no channels"):
    structured.prune("channel/l1", key=jax.random.key(0), model=mlp, variables=vm, fraction=0.5)


# ------------------------------------------------------- structured pruners by name

KEY = jax.random.key(3)


def by_name(name, sparsity, pruning_type="direct", model_v=None, **kw):
  model, v = model_v or lenet5()
  kw.setdefault("trained_params", v["params"])
  return pruning.prune(
    name,
    key=KEY,
    model=model,
    variables=v,
    sparsity=sparsity,
    pruning_type=pruning_type,
    input_shape=SHAPE,
    **kw,
  )


def kept_channels(m, path, size):
  """Indices of the output channels of kernel ``path`` with any kept weight."""
  k = np.asarray(m[path]["kernel"]).reshape(-1, size)
  return np.flatnonzero(k.any(0))


def test_registry_names_resolve():
  assert structured.KINDS == ("channel", "neuron", "head")  # head/: the structure issue
  assert len(structured.NAMES) == 3 * 6 * 4
  for name in structured.NAMES:
    p = pruning.get_pruner(name)
    kind, score, quota = structured.parse(name)
    assert p.structured and p.kind == kind
    assert p.quota == (None if quota == "global" else quota)
    assert p.after_training == (score in ("l1", "magnitude", "bn_scale"))
    assert p.needs_data == (score == "snip") and not p.target_dependent
  assert pruning.get_pruner("channel/l1").quota == "uniform"
  assert not pruning.get_pruner("random/igq").structured
  model, v = lenet5()
  r = pruning.ranking_for(
    "channel/l1/global", key=KEY, model=model, variables=v, sparsity=0.5, trained_params=v["params"]
  )
  assert isinstance(r, structured.ChannelRanking) and r.steps == 4 + 6 - 2


def lenet5_weights(c0, c1, h0=12, h1=8):
  """Kept weights of tiny LeNet-5 (28x28 input: 16 positions after conv_1) with c0, c1
  conv channels and h0, h1 hidden units, by hand."""
  return 25 * c0 + 25 * c0 * c1 + 16 * c1 * h0 + h0 * h1 + h1 * 10


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.7])
def test_direct_target_takes_the_fewest_channels_global_l1(sparsity):
  model, v = lenet5()
  n = lenet5_weights(4, 6)
  target = np.floor((1 - sparsity) * n + 1e-6)
  # reference: the global order of filter L1 norms, each layer's best filter kept
  norms = [
    np.abs(np.asarray(v["params"][f"conv_{i}"]["kernel"])).reshape(-1, c).sum(0)
    for i, c in enumerate((4, 6))
  ]
  items = sorted(
    (float(x), i, c) for i, nm in enumerate(norms) for c, x in enumerate(nm) if c != np.argmax(nm)
  )
  for m in range(len(items) + 1):
    gone = [sum(1 for _, i, _ in items[:m] if i == l) for l in range(2)]
    if lenet5_weights(4 - gone[0], 6 - gone[1]) <= target:
      break
  else:
    with pytest.raises(errors.UnreachableSparsityError):
      by_name("channel/l1/global", sparsity)
    return
  got = by_name("channel/l1/global", sparsity)
  for l, size in enumerate((4, 6)):
    want = sorted(set(range(size)) - {c for _, i, c in items[:m] if i == l})
    np.testing.assert_array_equal(kept_channels(got, f"conv_{l}", size), want)
  assert masks_lib.count(got)[0] == lenet5_weights(4 - gone[0], 6 - gone[1])
  if m > 0:  # one channel fewer misses the target
    fewer = [sum(1 for _, i, _ in items[: m - 1] if i == l) for l in range(2)]
    assert lenet5_weights(4 - fewer[0], 6 - fewer[1]) > target


@functools.cache
def resnet():
  model = ResNet18(num_classes=3, widths=(2, 2, 2, 2))
  return model, model.init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


@pytest.mark.parametrize("name", ["channel/random/global", "channel/l1/igq"])
def test_effective_target_is_the_first_member_that_reaches_it_brute_force(name):
  model, v = resnet()
  shape = (8, 8, 3)
  r = pruning.ranking_for(
    name,
    key=KEY,
    model=model,
    variables=v,
    sparsity=0.5,
    trained_params=v["params"],
    input_shape=shape,
  )
  n = r.total
  # brute force: effective and direct weights of every member of the family
  eff = [
    masks_lib.count(effective.effective_masks(model, r.masks_at(m), shape))[0]
    for m in range(r.steps + 1)
  ]
  direct = [masks_lib.count(r.masks_at(m))[0] for m in range(r.steps + 1)]
  assert eff == sorted(eff, reverse=True) and direct == sorted(direct, reverse=True)
  assert any(e < d for e, d in zip(eff, direct))  # 8x8 input: the last convs' border taps
  for s in (0.45, 0.6, 0.7):
    for kind, curve in (("effective", eff), ("direct", direct)):
      target = np.floor((1 - s) * n + 1e-6)
      hits = [m for m, k in enumerate(curve) if k <= target]
      if not hits:
        with pytest.raises(errors.UnreachableSparsityError) as err:
          pruning.masks_from_ranking(r, s, kind, input_shape=shape)
        assert err.value.max_sparsity == pytest.approx(1 - curve[-1] / n)
        continue
      got = pruning.masks_from_ranking(r, s, kind, input_shape=shape)
      np.testing.assert_equal(
        jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, r.masks_at(hits[0]))
      )
      assert hits[0] == 0 or curve[hits[0] - 1] > target  # one member fewer misses


def test_unreachable_names_the_largest_reachable_sparsity():
  n = lenet5_weights(4, 6)
  with pytest.raises(errors.UnreachableSparsityError) as err:
    by_name("channel/l1", 0.9)
  assert err.value.max_sparsity == pytest.approx(1 - lenet5_weights(1, 1) / n)
  with pytest.raises(errors.UnreachableSparsityError) as err:
    by_name("neuron/random/global", 0.9)
  assert err.value.max_sparsity == pytest.approx(1 - lenet5_weights(4, 6, 1, 1) / n)


def test_channel_quota_counts_by_hand():
  # IGQ: 4 / (1 + 4F) + 6 / (1 + 6F) = 5  =>  120 F^2 + 2 F - 5 = 0
  f = (-2 + np.sqrt(4 + 2400)) / 240
  want = np.round([4 / (1 + 4 * f), 6 / (1 + 6 * f)])
  np.testing.assert_array_equal(quotas.group_kept_counts("igq", 0.5, (4, 6)), want)
  assert list(want) == [2, 3]
  # ERK, no clipping: eps (4 * 1 + 6 * 0.25) = 5  =>  eps = 10 / 11
  eps = 10 / 11
  np.testing.assert_array_equal(
    quotas.group_kept_counts("erk", 0.5, (4, 6), (1.0, 0.25)), np.round([4 * eps, 6 * 0.25 * eps])
  )
  # ERK, layer 0 dense: 4 + 6 * 0.25 eps = 5  =>  eps = 2 / 3, layer 1 keeps 1
  np.testing.assert_array_equal(quotas.group_kept_counts("erk", 0.5, (4, 6), (2.0, 0.25)), [4, 1])
  np.testing.assert_array_equal(quotas.group_kept_counts("uniform", 0.5, (4, 6)), [2, 3])
  np.testing.assert_array_equal(quotas.group_kept_counts("igq", 0.0, (4, 6)), [1, 1])
  with pytest.raises(ValueError, match="quota='uniform_plus'"):
    quotas.group_kept_counts("uniform_plus", 0.5, (4, 6))
  # on LeNet-5: ERK ratios of the conv kernels, 5x5x1x4 and 5x5x4x6
  model, v = lenet5()
  r = pruning.ranking_for(
    "channel/l1/erk", key=KEY, model=model, variables=v, sparsity=0.5, trained_params=v["params"]
  )
  np.testing.assert_allclose(r.ratios, [15 / 100, 20 / 600])
  # m = 3, density 7/10: unclipped eps = 7 / (4 * 0.15 + 6 / 30) = 8.75 makes conv_0
  # dense (0.15 eps > 1); then 4 + 6 eps / 30 = 7 => eps = 15, conv_1 keeps 6 / 2 = 3
  np.testing.assert_array_equal(r.removed_counts(3), [0, 3])
  # m = 7, density 3/10: eps (4 * 0.15 + 6 / 30) = 3 => eps = 3.75 (no clipping):
  # conv_0 keeps round(4 * 0.5625) = 2, conv_1 round(6 * 0.125) = 1
  np.testing.assert_array_equal(r.removed_counts(7), [2, 5])


def test_after_training_scores_read_the_trained_params():
  model, v = lenet5()
  trained = jax.tree.map(jnp.ones_like, v["params"])
  trained["conv_0"]["kernel"] = trained["conv_0"]["kernel"] * jnp.array([1.0, 5, 2, 4])
  trained["norm_0"]["scale"] = jnp.array([3.0, 1, 4, 2])
  for name, order in (
    ("channel/l1", [0, 2, 3, 1]),
    ("channel/magnitude", [0, 2, 3, 1]),
    ("channel/bn_scale", [1, 3, 0, 2]),
  ):
    r = pruning.ranking_for(
      name, key=KEY, model=model, variables=v, sparsity=0.5, trained_params=trained
    )
    np.testing.assert_array_equal(r.orders[0], order)
    with pytest.raises(ValueError, match="trained_params="):
      pruning.ranking_for(name, key=KEY, model=model, variables=v, sparsity=0.5)
  for name in ("channel/random", "channel/snip", "channel/synflow"):
    assert not pruning.get_pruner(name).after_training


def test_structured_masks_compact_to_the_kept_channels_and_the_same_function():
  model, v = resnet()
  shape = (8, 8, 3)
  r = pruning.ranking_for(
    "channel/l1/global", key=KEY, model=model, variables=v, sparsity=0.5, trained_params=v["params"]
  )
  m = pruning.masks_from_ranking(r, 0.5, "direct")
  kept = r.kept(
    int(
      np.argmax(
        [masks_lib.count(r.masks_at(k))[0] <= np.floor(0.5 * r.total) for k in range(r.steps + 1)]
      )
    )
  )
  c = compact.compact(model, v, m, input_shape=shape, verify=True)
  new_model, new_v, new_m = c
  assert {k: list(x) for k, x in c.plan.kept.items()} == {k: list(x) for k, x in kept.items()}
  # every kernel a group writes has exactly its kept units left (the compacted model's
  # own groups are named anew: a group left with one unit is no longer removable)
  flat = dict(zip(sparsejax.trace(model, shape, variables=v).paths, jax.tree.leaves(v["params"])))
  new_flat = {
    masks_lib.path_str(p): a for p, a in jax.tree_util.tree_leaves_with_path(new_v["params"])
  }
  for g in sparsejax.structure(model, shape, variables=v).removable("channel"):
    for sl in g.slices_of("writes"):
      assert new_flat[sl.path].shape[sl.axis] == len(kept[g.name]), (g.name, sl.path)
      assert flat[sl.path].shape[sl.axis] == g.size
  assert all(bool(jnp.all(k)) for k in masks_lib.mask_leaves(new_m))
  x = jax.random.normal(jax.random.key(5), (4,) + shape)
  want = model.apply({**v, "params": masks_lib.apply(v["params"], m)}, x, train=False)
  got = new_model.apply(new_v, x, train=False)
  np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_a_removed_filter_kills_the_slices_it_alone_fed():
  # LeNet-300-100 with hidden (3, 2): removing neuron 1 of dense_0 masks its filter
  # (784 weights) and dense_1's row 1 (2 weights).
  model = LeNet300100(hidden=(3, 2))
  v = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  n = 784 * 3 + 3 * 2 + 2 * 10
  keep = {"dense_0": [0, 2], "dense_1": [0, 1]}
  m = structured.masks_for(model, v, keep)
  assert masks_lib.count(m)[0] == n - 784 - 2
  assert effective.effective_sparsity(model, m, SHAPE) == pytest.approx(
    masks_lib.direct_sparsity(m)
  )  # the slices are masked with the filter
  filter_only = jax.tree.map(lambda a: a, m)
  filter_only["dense_1"]["kernel"] = jnp.ones((3, 2), bool)
  assert masks_lib.count(filter_only)[0] == n - 784
  eff = effective.effective_masks(model, filter_only, SHAPE)
  assert masks_lib.count(eff)[0] == n - 784 - 2  # row 1 of dense_1 is dead
  assert effective.effective_sparsity(model, filter_only, SHAPE) > masks_lib.direct_sparsity(
    filter_only
  )


def test_structured_bad_input_names_the_pruner_and_the_model():
  mlp = LeNet300100(hidden=(10, 6))
  vm = mlp.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  with pytest.raises(ValueError, match=r"'channel/l1'.*model=LeNet300100.*no channels"):
    pruning.prune(
      "channel/l1", key=KEY, model=mlp, variables=vm, sparsity=0.5, trained_params=vm["params"]
    )

  def fn(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"]["kernel"]

  # a function is traced like any model; this one has only its output layer
  with pytest.raises(ValueError, match=r"'neuron/random'.*model=fn has no neurons to prune"):
    pruning.prune(
      "neuron/random",
      key=KEY,
      model=fn,
      variables={"w": {"kernel": jnp.ones((784, 3))}},
      sparsity=0.5,
      input_shape=SHAPE,
    )

  import flax.linen as nn

  class Other(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(4)(x.reshape(x.shape[0], -1))))

  # a network outside the zoo is pruned like the zoo (it was refused before the structure
  # issue: its groups come from its traced program now)
  other = Other()
  vo = other.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  m = pruning.prune(
    "neuron/synflow", key=KEY, model=other, variables=vo, sparsity=0.5, input_shape=SHAPE
  )
  # Dense(3) is constructed first in the expression, so Flax names the output layer
  # Dense_0 and the hidden layer Dense_1
  kept = np.asarray(m["Dense_1"]["kernel"]).any(0)
  assert 1 <= kept.sum() < 4 and not np.asarray(m["Dense_0"]["kernel"])[~kept].any()
  with pytest.raises(ValueError, match=r"input_shape=None: model=Other"):
    pruning.ranking_for("neuron/random", key=KEY, model=other, variables=vo, sparsity=0.5)
  model, v = lenet5()
  with pytest.raises(ValueError, match="prunable="):
    by_name("channel/random", 0.3, prunable=lambda p: True)
  with pytest.raises(ValueError, match="quota='uniform_plus'"):
    pruning.Pruner("channel/mine", lambda c: {}, "uniform_plus", kind="channel")
  with pytest.raises(ValueError, match="kind='filters'"):
    pruning.Pruner("channel/mine", lambda c: {}, kind="filters")


def test_a_user_structured_pruner_by_registration():
  def last_first(c):  # keeps the lowest channel indices
    spaces = structured.spaces_of(c.model, c.variables, "channel")
    return {s.name: -np.arange(s.size, dtype=float) for s in spaces}

  pruning.register_pruner(pruning.Pruner("channel/index", last_first, kind="channel"))
  try:
    m = by_name("channel/index", 0.3)
  finally:
    del pruning.PRUNERS["channel/index"]
  assert masks_lib.count(m)[0] <= np.floor(0.7 * lenet5_weights(4, 6) + 1e-6)
  # uniform quota: both layers keep their lowest indices
  kept = [kept_channels(m, f"conv_{i}", c) for i, c in enumerate((4, 6))]
  for k in kept:
    np.testing.assert_array_equal(k, np.arange(len(k)))


# ------------------------------------------------------- experiment binaries by name


def test_prune_train_structured_after_dense_training_and_at_init(tmp_path):
  from experiments import configs, datasource, prune_train, run_config

  source = datasource.DataSource(synthetic=True, num_examples=256)
  tiny = ["train_steps=10", "eval_every=10", "checkpoint_every=10", "log_every=10"]

  def run(**fields):
    config = configs.load("lenet300100", tiny + [f"{k}={v}" for k, v in fields.items()])
    return config, prune_train.run(config, out_dir=str(tmp_path), source=source)

  run(pruner="dense")
  config, r = run(pruner="neuron/l1", compression=10, pruning_type="effective")
  assert r["status"] == "ok" and r["effective_compression"] >= 10
  assert r["effective_compression"] == pytest.approx(r["direct_compression"])
  # the kept neurons of dense_0 are those of largest L1 norm in the *trained* weights
  dense_dir = tmp_path / run_config.run_name(prune_train.dense_config(config))
  final = prune_train._load_params(
    str(dense_dir / "weights" / "final"),
    prune_train.models.init(
      prune_train.models.create("lenet300100"), jax.random.key(0), (28, 28, 1)
    )["params"],
  )
  m = masks_lib.load(tmp_path / run_config.run_name(config) / "masks.npz", final)
  kept = kept_channels(m, "dense_0", 300)
  norms = np.abs(np.asarray(final["dense_0"]["kernel"])).sum(0)
  np.testing.assert_array_equal(kept, np.sort(np.argsort(norms, kind="stable")[-len(kept) :]))
  _, r = run(pruner="neuron/snip/global", compression=10, pruning_type="direct")
  assert r["status"] == "ok" and r["direct_compression"] >= 10
  assert r["history"][-1]["step"] == 10


def test_compression_table_with_structured_pruners():
  from experiments import compression

  rows = compression.sweep(
    "lenet300100", ["neuron/random/igq", "neuron/magnitude"], ["direct", "effective"], [10.0, 1e5]
  )
  assert [(r["pruner"], r["pruning_type"], r["status"]) for r in rows] == [
    ("neuron/random/igq", "direct", "ok"),
    ("neuron/random/igq", "effective", "ok"),
    ("neuron/random/igq", "direct", "unreachable"),
    ("neuron/random/igq", "effective", "unreachable"),
    ("neuron/magnitude", "direct", "ok"),
    ("neuron/magnitude", "effective", "ok"),
    ("neuron/magnitude", "direct", "unreachable"),
    ("neuron/magnitude", "effective", "unreachable"),
  ]
  for r in rows[:2] + rows[4:6]:
    assert r["direct_compression"] >= 10 and r["effective_compression"] >= 10


def test_sweep_grid_runs_dense_first_for_after_training_structured_pruners():
  from experiments import grid

  runs = grid.grid(["vgg19"], ["channel/bn_scale/global"], [10.0], ["effective"], [0])
  assert [r["pruner"] for r in runs] == ["dense", "channel/bn_scale/global"]
  assert [r["pruner"] for r in grid.grid(["vgg19"], ["channel/snip"], [10.0], ["direct"], [0])] == [
    "channel/snip"
  ]
