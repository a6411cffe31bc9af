"""Tests for sparsejax.compact: the compacted network computes the masked one's function.

References: channel reach/coreach against the brute-force unit graph
(tests/reference_graph.py); the kept units of an MLP against boolean matrix propagation;
function equality of the logits (inference mode); active weights preserved exactly; a
short masked training run against the original's. Small instances of every zoo family
(variables perturbed so that biases, batch-norm statistics and hence folded constants
are nonzero), and the five zoo networks pruned at initialization.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejax
from sparsejax import compact, effective, errors, models, pruning
from sparsejax import masks as masks_lib
from sparsejax.models import VGG, LeNet5, LeNet300100, ResNet18
from tests import reference_graph as ref

HYP = dict(
  deadline=None,
  max_examples=3,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SMALL = {
  "lenet300100": (LeNet300100(hidden=(24, 12)), (28, 28, 1)),
  "lenet5": (LeNet5(channels=(4, 6), hidden=(12, 8)), (28, 28, 1)),  # MNIST-shaped
  "vgg": (VGG(config=(6, "M", 8, "M", 8, 10, "M"), num_classes=5), (16, 16, 3)),
  "resnet18": (ResNet18(num_classes=5, widths=(4, 6, 6, 8)), (16, 16, 3)),
}


def perturb(variables, key):
  """Nonzero biases, batch-norm shifts and statistics (as after training)."""
  out = {}
  for col, tree in variables.items():
    flat = traverse_util.flatten_dict(tree, sep="/")
    for i, (k, a) in enumerate(sorted(flat.items())):
      kk = jax.random.fold_in(key, i)
      if k.endswith("kernel"):
        continue
      if k.endswith(("var", "scale")):
        flat[k] = jax.random.uniform(kk, a.shape, minval=0.5, maxval=2.0)
      else:
        flat[k] = 0.5 * jax.random.normal(kk, a.shape)
    out[col] = traverse_util.unflatten_dict(flat, sep="/")
  return out


@functools.cache
def small(name):
  model, shape = SMALL[name]
  v = model.init(jax.random.key(0), jnp.ones((1,) + shape))
  return model, shape, perturb(v, jax.random.key(5))


def dense(name):
  """The dense mask of small(name) (its traced prunable set); a new tree each call."""
  model, shape, v = small(name)
  return sparsejax.trace(model, shape, variables=v).ones()


def layer_masks(like, rng, sparsities):
  """Bernoulli masks at the leaves of the mask tree ``like``: layer l (tree order) kept
  with probability 1 - sparsities[l]."""
  levels = iter(sparsities)
  return masks_lib.map_masks(lambda m: jnp.asarray(rng.random(m.shape) >= next(levels)), like)


def active(model, m, shape):
  return masks_lib.count(effective.effective_masks(model, m, shape))[0]


# --------------------------------------------------------------------------- channel maps


REF_ARCHS = [
  (
    "cnn_same_s2_odd",
    (5, 5, 2),
    (
      ("conv", 3, 3, 1, "SAME"),
      ("conv", 3, 3, 2, "SAME"),
      ("pool", "max", 2, 1),
      ("flatten",),
      ("dense", 3),
    ),
  ),
  (
    "res_6x6",
    (6, 6, 2),
    (("conv", 3, 3, 1, "SAME"), ("res", 4, 2), ("res", 4, 1), ("gap",), ("dense", 3)),
  ),
]


@pytest.mark.parametrize("arch", REF_ARCHS, ids=lambda a: a[0])
@settings(**HYP)
@given(seed=st.integers(0, 2**32 - 1), level=st.sampled_from([0.3, 0.6, 0.8, 0.9]))
def test_channel_reach_matches_the_unit_graph(arch, seed, level):
  _, shape, spec = arch
  model = ref.make_model(spec)
  graph = ref.build_graph(spec, shape)
  shapes = ref.param_shapes(model, shape)
  rng = np.random.default_rng(seed)
  by = {l.path: rng.random(l.kernel_shape) >= level for l in graph.layers}
  tree = jax.tree_util.tree_map_with_path(
    lambda p, s: by.get(masks_lib.path_str(p)[: -len("/kernel")]), shapes
  )
  got = effective.channel_reach(model, tree, shape)
  want = ref.reference(graph, [by[l.path] for l in graph.layers])
  assert list(got) == [l.path for l in graph.layers]
  for l in graph.layers:
    c = l.out_ids.shape[-1]
    ids = l.out_ids.reshape(-1, c)
    np.testing.assert_array_equal(got[l.path][0], want.reach[ids].any(0), err_msg=l.path)
    np.testing.assert_array_equal(got[l.path][1], want.coreach[ids].any(0), err_msg=l.path)


# --------------------------------------------------------------------------- small instances


@pytest.mark.parametrize(
  "name",
  # VGG (about a minute): pytest -m exhaustive; ResNet-18 covers convolutions, batch
  # norm and residual streams by default.
  [pytest.param(n, marks=pytest.mark.exhaustive) if n == "vgg" else n for n in SMALL],
)
@settings(**HYP)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_compacted_small_networks_compute_the_same_function(name, seed, data):
  model, shape, v = small(name)
  n = len(masks_lib.paths(dense(name)))
  levels = data.draw(st.lists(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.97]), min_size=n, max_size=n))
  m = layer_masks(dense(name), np.random.default_rng(seed), levels)
  fold = data.draw(st.booleans())
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, fold=fold)
  assert compact.check_equal(model, v, m, new_model, new_v, shape) <= compact.RTOL
  # only inactive weights go: the active ones are exactly those of the original
  assert active(new_model, new_m, shape) == active(model, m, shape)
  masks_lib.validate(new_m, new_v["params"])
  p = compact.plan(model, v, m, input_shape=shape, fold=fold)
  spaces, _ = compact.channel_spaces(new_model)
  assert [s.size for s in spaces] == [len(p.kept[s.name]) for s in spaces]
  if not fold:
    assert not any(len(f) for f in p.folded.values())


@settings(**HYP)
@given(
  seed=st.integers(0, 2**32 - 1),
  levels=st.lists(st.sampled_from([0.5, 0.9, 0.97]), min_size=3, max_size=3),
)
def test_mlp_keeps_exactly_the_live_neurons(seed, levels):
  """Dense readers: every constant is folded, so kept = reach AND coreach (boolean
  matrix propagation), or one neuron where none is live."""
  model, shape, v = small("lenet300100")
  m = layer_masks(dense("lenet300100"), np.random.default_rng(seed), levels)
  ks = [np.asarray(m[f"dense_{i}"]["kernel"]) for i in range(3)]
  reach = [np.ones(ks[0].shape[0], bool)]
  for k in ks:
    reach.append((reach[-1].astype(int) @ k.astype(int)) > 0)
  co = [np.ones(ks[-1].shape[1], bool)]
  for k in reversed(ks):
    co.insert(0, (k.astype(int) @ co[0].astype(int)) > 0)
  p = compact.plan(model, v, m, input_shape=shape)
  for i in range(2):
    live = np.flatnonzero(reach[i + 1] & co[i + 1])
    want = live if len(live) else p.kept[f"dense_{i}"][:1]
    np.testing.assert_array_equal(p.kept[f"dense_{i}"], want)
    assert set(p.folded[f"dense_{i}"]) <= set(np.flatnonzero(co[i + 1] & ~reach[i + 1]))


def test_zero_constants_are_dropped_and_padding_keeps_nonzero_ones():
  """A VGG channel cut from the input but not from the output: at initialization its
  constant is 0 (dropped); with a nonzero shift it is kept (a 'SAME' conv reads it)."""
  model, shape, v = small("vgg")
  m = dense("vgg")
  m["conv_00"]["kernel"] = m["conv_00"]["kernel"].at[..., 2].set(False)
  init = model.init(jax.random.key(0), jnp.ones((1,) + shape))
  assert 2 in compact.plan(model, init, m, input_shape=shape).dropped["conv_00"]
  p = compact.plan(model, v, m, input_shape=shape)
  assert 2 in p.kept["conv_00"] and not len(p.folded["conv_00"])
  # the last conv's constants are read by the Dense: folded (or dropped where relu
  # makes them 0)
  m["conv_03"]["kernel"] = m["conv_03"]["kernel"].at[..., :3].set(False)
  p = compact.plan(model, v, m, input_shape=shape)
  assert set(p.folded["conv_03"]) | set(p.dropped["conv_03"]) == {0, 1, 2}
  assert len(p.folded["conv_03"])
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, verify=True)
  assert new_model.config[-2] == 7
  # a compacted network has nothing left to remove
  again = compact.plan(new_model, new_v, new_m, input_shape=shape)
  assert all(len(k) == again.sizes[s] for s, k in again.kept.items())


def test_residual_streams_shrink_together():
  model, shape, v = small("resnet18")
  m = dense("resnet18")
  # stream 2 channel 1: no writer produces it and no reader reads it
  for w in ("stage2_block0/conv_2", "stage2_block1/conv_2", "stage2_block0/shortcut_conv"):
    a, b = w.split("/")
    m[a][b]["kernel"] = m[a][b]["kernel"].at[..., 1].set(False)
  for r in ("stage2_block1/conv_1", "stage3_block0/conv_1", "stage3_block0/shortcut_conv"):
    a, b = r.split("/")
    m[a][b]["kernel"] = m[a][b]["kernel"].at[..., 1, :].set(False)
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, verify=True)
  assert new_model.widths == (4, 5, 6, 8)
  assert new_v["params"]["stage2_block0"]["shortcut_conv"]["kernel"].shape[-1] == 5
  assert new_v["batch_stats"]["stage2_block1"]["norm_2"]["mean"].shape == (5,)
  # written by one block only: still read by the other, kept
  m2 = dense("resnet18")
  m2["stage2_block0"]["conv_2"]["kernel"] = (
    m2["stage2_block0"]["conv_2"]["kernel"].at[..., 1].set(False)
  )
  assert compact.compact(model, v, m2, input_shape=shape)[0].widths == (4, 6, 6, 8)


# --------------------------------------------------------------------------- bad input


def test_verify_raises_on_a_different_function():
  model, shape, v = small("lenet300100")
  m = dense("lenet300100")
  new_model, new_v, _ = compact.compact(model, v, m, input_shape=shape, verify=True)
  bad = jax.tree.map(lambda a: a, new_v)
  bad["params"]["dense_2"]["bias"] = bad["params"]["dense_2"]["bias"] + 1e-2
  with pytest.raises(errors.CompactionMismatchError) as e:
    compact.check_equal(model, v, m, new_model, bad, shape)
  assert e.value.max_diff > 0 and isinstance(e.value, ValueError)


def test_other_models_compact_and_mismatched_masks_are_value_errors():
  import flax.linen as nn

  class Mine(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3)(x.reshape(len(x), -1))

  # a model outside the zoo compacts (it was refused before the structure issue); with
  # only an output layer nothing is removable, and the plan says why
  mine = Mine()
  v = mine.init(jax.random.key(0), jnp.ones((1, 4)))
  mine_dense = sparsejax.trace(mine, (4,), variables=v).ones()
  c = compact.compact(mine, v, mine_dense, input_shape=(4,), verify=True)
  assert c.module is None and not c.plan.sizes and "output" in c.plan.blocked["Dense_0"]
  model, shape, v = small("lenet300100")
  with pytest.raises(ValueError):
    compact.compact(model, v, dense("lenet5"), input_shape=shape)
  with pytest.raises(ValueError, match="variables"):
    compact.compact(model, v["params"], dense("lenet300100"), input_shape=shape)
  bad = dense("lenet300100")
  bad["dense_1"]["kernel"] = bad["dense_1"]["kernel"][:, :5]
  with pytest.raises(ValueError, match=r"masks\['dense_1/kernel'\] has shape \(24, 5\)"):
    compact.compact(model, v, bad, input_shape=shape)


# --------------------------------------------------------------------------- the zoo


@functools.cache
def zoo(name):
  model, shape = models.create(name), models.input_shape(name)
  return model, shape, model.init(jax.random.key(0), jnp.ones((1,) + shape))


def pruned(name, pruner, compression):
  model, shape, v = zoo(name)
  batches = [
    {
      "image": jax.random.normal(jax.random.key(3), (16,) + shape),
      "label": jnp.arange(16) % model.num_classes,
    }
  ]
  m = pruning.prune(
    pruner,
    key=jax.random.key(1),
    model=model,
    variables=v,
    sparsity=1 - 1 / compression,
    pruning_type="effective",
    input_shape=shape,
    batches=batches,
    rounds=10 if pruner == "synflow" else None,
  )
  return model, shape, v, m


EXH = pytest.mark.exhaustive
ZOO_CASES = (
  [("lenet300100", p, c) for p in ("random/igq", "snip", "synflow") for c in (10, 100, 1000)]
  # LeNet-5 at 10x and 1000x (pytest -m exhaustive): the real-MNIST grid below compacts
  # it at 10x, 100x and 1000x effective by default.
  + [
    ("lenet5", "synflow", c) if c == 100 else pytest.param("lenet5", "synflow", c, marks=EXH)
    for c in (10, 100, 1000)
  ]
  + [  # the large networks (about 2 CPU-minutes): pytest -m exhaustive
    pytest.param(*case, marks=pytest.mark.exhaustive)
    for case in [("vgg16", "snip", 100), ("vgg19", "synflow", 100), ("resnet18", "random/igq", 30)]
  ]
)


@pytest.mark.parametrize("name,pruner,compression", ZOO_CASES)
def test_zoo_networks_pruned_at_init_compact_exactly(name, pruner, compression):
  model, shape, v, m = pruned(name, pruner, compression)
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape)
  x = jax.random.normal(jax.random.key(7), (1,) + shape)  # batch 1
  assert compact.check_equal(model, v, m, new_model, new_v, shape, x=x) <= compact.RTOL
  assert active(new_model, new_m, shape) == active(model, m, shape)
  # at initialization every constant is 0: nothing is folded, and every kept unit is live
  p = compact.plan(model, v, m, input_shape=shape)
  assert not any(len(f) for f in p.folded.values())
  if compression >= 100:
    assert p.live_fraction() < 1.0


@functools.cache
def mnist_zoo(name):
  """LeNet-300-100 or LeNet-5 (its MNIST-shaped variant: the zoo's LeNet-5 on 28x28x1)."""
  model, shape = models.create(name), (28, 28, 1)
  return model, shape, model.init(jax.random.key(0), jnp.ones((1,) + shape))


AT_INIT = [
  n
  for n, p in pruning.PRUNERS.items()
  if p.kind == "weights" and not p.after_training and n != "dense"
]


@pytest.fixture(scope="module")
def mnist_batches(mnist_tfds):
  """(score batches from the train split, one normalized test batch of 256)."""
  from sparsejax import data

  x, y = data.load_split("mnist", "train", **mnist_tfds)
  xt, _ = data.load_split("mnist", "test", **mnist_tfds)
  score = [{"image": data.normalize(x[:128], "mnist"), "label": jnp.asarray(y[:128])}]
  return score, data.normalize(xt[:256], "mnist")


# Both LeNets with three at-init pruners run by default; the rest of the grid (about 5
# CPU-minutes) on request: pytest -m exhaustive tests/test_compact.py
MNIST_CASES = [
  (name, p)
  if p in ("random/igq", "synflow") or (p == "snip" and name == "lenet300100")
  else pytest.param(name, p, marks=pytest.mark.exhaustive)
  for name in ("lenet300100", "lenet5")
  for p in AT_INIT
]


@pytest.mark.slow
@pytest.mark.parametrize("name,pruner", MNIST_CASES)
def test_every_at_init_pruner_compacts_exactly_on_real_mnist(name, pruner, mnist_batches):
  """The issue's acceptance grid for the MNIST networks: every at-init pruner at 10x,
  100x and 1000x effective; logits equal (<= RTOL x scale) on 256 real test images and
  on one (batch 1)."""
  if pruner == "random/uniform_plus" and name == "lenet300100":
    pytest.skip("uniform_plus is defined for convolutional networks only")
  score, test = mnist_batches
  model, shape, v = mnist_zoo(name)
  checked = 0
  for compression in (10, 100, 1000):
    try:
      m = pruning.prune(
        pruner,
        key=jax.random.key(1),
        model=model,
        variables=v,
        sparsity=1 - 1 / compression,
        pruning_type="effective",
        input_shape=shape,
        batches=score,
        rounds=10 if pruning.get_pruner(pruner).iterative else None,
      )
    except errors.UnreachableSparsityError:
      assert compression == 1000, (pruner, compression)  # only the extreme target may be
      continue
    new_model, new_v, _ = compact.compact(model, v, m, input_shape=shape)
    for x in (test, test[:1]):
      assert compact.check_equal(model, v, m, new_model, new_v, shape, x=x) <= compact.RTOL
    checked += 1
  assert checked >= 2


# --------------------------------------------------------------------------- training


def _train(model, variables, m, shape, dataset, steps=4):
  from sparsejax import data, training

  cfg = training.TrainConfig(
    dataset=dataset,
    batch_size=16,
    train_steps=steps,
    learning_rate=0.05,
    momentum=0.9,
    weight_decay=1e-3,
    decay_boundaries=(0.5,),
  )
  images, labels = data.synthetic_split(dataset, "train", 16 * steps)
  state = training.create_train_state(
    model, jax.random.key(0), shape, cfg, masks=m, params=variables["params"]
  )
  losses = []
  for s in range(steps):
    batch = {"image": images[16 * s : 16 * (s + 1)], "label": labels[16 * s : 16 * (s + 1)]}
    state, metrics = training.train_step(
      state, batch, jax.random.key(2), model=model, spec=dataset, config=cfg
    )
    losses.append(float(metrics["loss"]))
  return np.array(losses), {"params": state.params, "batch_stats": state.batch_stats}


@pytest.mark.parametrize("name", ["lenet300100", "vgg"])
def test_compacted_network_trains_like_the_masked_one(name):
  """Same seed, same data: the loss curves agree, and so do the trained functions."""
  if name == "lenet300100":
    model, shape, v = zoo(name)
    dataset = "mnist"
  else:
    model, shape = VGG(config=(6, "M", 8, "M", 8, 10, "M")), (32, 32, 3)
    v = model.init(jax.random.key(0), jnp.ones((1,) + shape))
    dataset = "cifar10"
  m = pruning.prune(
    "synflow",
    key=jax.random.key(1),
    model=model,
    variables=v,
    sparsity=0.99,
    pruning_type="effective",
    input_shape=shape,
    rounds=10,
  )
  new_model, new_v, new_m = compact.compact(model, v, m, input_shape=shape, verify=True)
  assert sum(len(k) for k in compact.plan(model, v, m, input_shape=shape).kept.values()) < sum(
    s.size for s in compact.channel_spaces(model)[0]
  )
  loss, trained = _train(model, v, m, shape, dataset)
  new_loss, new_trained = _train(new_model, new_v, new_m, shape, dataset)
  np.testing.assert_allclose(new_loss, loss, rtol=1e-5)
  x = jax.random.normal(jax.random.key(4), (4,) + shape)
  ref_out = model.apply(trained, x, train=False)
  out = new_model.apply(new_trained, x, train=False)
  np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref_out))))
