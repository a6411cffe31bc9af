"""Every pruner on models users write themselves (plain Flax modules, apply functions),
and the input-to-output order of layers taken from the traced program, not key names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import compact, effective, pruning, scores
from sparsejax import masks as masks_lib

SHAPE = (6, 6, 1)


class BackwardsCNN(nn.Module):
  """Three layers whose names sort last-to-first."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), name="z_first")(x))
    x = nn.relu(nn.Conv(4, (3, 3), name="m_middle")(x))
    return nn.Dense(3, name="a_last")(x.reshape(x.shape[0], -1))


class AutoNamedConvs(nn.Module):
  """11 convolutions with Flax's automatic names Conv_0 ... Conv_10 (Conv_10 sorts
  before Conv_2) and a mean head."""

  @nn.compact
  def __call__(self, x):
    for _ in range(11):
      x = nn.relu(nn.Conv(2, (3, 3))(x))
    return jnp.mean(x, axis=(1, 2))


def _kernel_sparsity(masks, path):
  return {p: s for p, s in masks_lib.layer_sparsities(masks).items()}[path]


def test_uniform_plus_keeps_the_first_layer_in_data_flow_order_dense():
  model = BackwardsCNN()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  assert sparsejax.trace(model, SHAPE, variables=variables).prunable_paths == [
    "z_first/kernel",
    "m_middle/kernel",
    "a_last/kernel",
  ]
  masks = pruning.prune(
    "random/uniform_plus",
    key=jax.random.key(1),
    model=model,
    variables=variables,
    sparsity=0.5,
    input_shape=SHAPE,
  )
  assert _kernel_sparsity(masks, "z_first/kernel") == 0.0  # first: dense
  assert _kernel_sparsity(masks, "a_last/kernel") <= 0.8 + 1e-6
  assert _kernel_sparsity(masks, "m_middle/kernel") > 0.5
  # the same order inside the jitted effective-target search
  eff = pruning.prune(
    "random/uniform_plus",
    key=jax.random.key(1),
    model=model,
    variables=variables,
    sparsity=0.5,
    pruning_type="effective",
    input_shape=SHAPE,
  )
  assert _kernel_sparsity(eff, "z_first/kernel") == 0.0
  assert _kernel_sparsity(eff, "a_last/kernel") <= 0.8 + 1e-6
  assert effective.effective_sparsity(model, eff, SHAPE, variables=variables) >= 0.5


def test_automatic_names_past_ten_are_ordered_by_data_flow():
  model = AutoNamedConvs()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  want = [f"Conv_{i}/kernel" for i in range(11)]
  traced = sparsejax.trace(model, SHAPE, variables=variables)
  assert traced.prunable_paths == want
  units = effective.active_units(traced, traced.ones())
  assert list(units) == [p[: -len("/kernel")] for p in want]
  masks = pruning.prune(
    "random/uniform_plus",
    key=jax.random.key(1),
    model=model,
    variables=variables,
    sparsity=0.5,
    input_shape=SHAPE,
  )
  assert _kernel_sparsity(masks, "Conv_0/kernel") == 0.0
  assert _kernel_sparsity(masks, "Conv_10/kernel") <= 0.8 + 1e-6  # the true last layer
  assert _kernel_sparsity(masks, "Conv_9/kernel") > 0.3


class FlaxCNN(nn.Module):
  """As the Flax examples write a CNN: Conv, BatchNorm, relu, max pool, Dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn1")(x)
    x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    x = nn.Conv(6, (3, 3), name="conv2")(x)
    x = nn.BatchNorm(use_running_average=not train, name="bn2")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(3, name="head")(x)


def _batches(n=2, size=8):
  rng = np.random.default_rng(0)
  return [
    {
      "image": jnp.asarray(rng.normal(size=(size,) + SHAPE), jnp.float32),
      "label": jnp.asarray(rng.integers(0, 3, size), jnp.int32),
    }
    for _ in range(n)
  ]


FAST = {"snip/iterative": 3, "synflow": 3}  # rounds of the iterative pruners


@pytest.mark.parametrize(
  "pruner",
  [
    p
    for p in pruning.PRUNERS
    if p != "dense"
    and not pruning.PRUNERS[p].structured
    # block pruners keep whole blocks: off the target by up to a block (tests/test_in_jit_updates)
    and pruning.PRUNERS[p].ranking is None
  ],
)
def test_every_pruner_on_a_plain_flax_cnn_both_pruning_types(pruner):
  model = FlaxCNN()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  trained = jax.tree.map(lambda w: w * 1.5 + 0.01, variables["params"])
  sparsity = 0.8
  ranking = pruning.ranking_for(
    pruner,
    key=jax.random.key(2),
    model=model,
    variables=variables,
    sparsity=sparsity,
    input_shape=SHAPE,
    batches=_batches(),
    trained_params=trained,
    rounds=FAST.get(pruner),
  )
  direct = pruning.masks_from_ranking(ranking, sparsity, "direct")
  assert abs(masks_lib.direct_sparsity(direct) - sparsity) < 0.02
  eff = pruning.masks_from_ranking(
    ranking, sparsity, "effective", model=model, input_shape=SHAPE, variables=variables
  )
  s_eff = effective.effective_sparsity(model, eff, SHAPE, variables=variables)
  assert s_eff >= sparsity - 1e-9
  assert masks_lib.direct_sparsity(eff) <= s_eff


def test_structured_pruners_on_a_plain_flax_cnn():
  """Structured pruning finds the CNN's channels in its traced program (they were refused
  before the structure issue: only the zoo had hand-written channel tables): whole
  channels are masked (a conv's kernel columns and every row that reads them, the
  flattened head's included), and compaction removes them with the same function. The
  CNN has no hidden Dense units: neuron pruners say so and name what it has."""
  model = FlaxCNN()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  m = pruning.prune(
    "channel/l1",
    key=jax.random.key(2),
    model=model,
    variables=variables,
    sparsity=0.5,
    input_shape=SHAPE,
    trained_params=variables["params"],
  )
  assert masks_lib.direct_sparsity(m) >= 0.5
  k1, k2, head = (np.asarray(m[n]["kernel"]) for n in ("conv1", "conv2", "head"))
  kept1, kept2 = k1.any(axis=(0, 1, 2)), k2.any(axis=(0, 1, 2))
  assert 1 <= kept1.sum() < 4 and 1 <= kept2.sum() < 6
  assert (k1.all(axis=(0, 1, 2)) == kept1).all() and not k2[:, :, ~kept1, :].any()
  # the head reads the flattened [h, w, c] features: a removed channel's rows are masked
  assert not head.reshape(-1, 6, 3)[:, ~kept2, :].any()
  c = compact.compact(model, variables, m, input_shape=SHAPE, verify=True)
  assert c.params["conv1"]["kernel"].shape[-1] == kept1.sum()
  assert c.params["conv2"]["kernel"].shape[-1] == kept2.sum()
  with pytest.raises(
    ValueError, match=r"'neuron/random/global'.*model=FlaxCNN has no neurons.*channel/"
  ):
    pruning.prune(
      "neuron/random/global",
      key=jax.random.key(2),
      model=model,
      variables=variables,
      sparsity=0.5,
      input_shape=SHAPE,
    )


def _fn_model(params, x):
  h = jax.nn.relu(
    jax.lax.conv_general_dilated(
      x, params["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return h.reshape(h.shape[0], -1) @ params["head"]["kernel"]


def _fn_params():
  rng = np.random.default_rng(3)
  return {
    "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)},
    "head": {"kernel": jnp.asarray(rng.normal(size=(36, 3)), jnp.float32)},
  }


def _fn_loss(params, batch):
  logits = _fn_model(params, batch["x"])
  return jnp.mean((logits - batch["y"]) ** 2)


@pytest.mark.parametrize(
  "pruner", ["random/igq", "magnitude/global", "lamp", "snip", "snip/iterative", "grasp", "synflow"]
)
def test_pruners_on_an_apply_function_with_a_user_loss(pruner):
  params = _fn_params()
  rng = np.random.default_rng(4)
  batches = [
    {
      "x": jnp.asarray(rng.normal(size=(4,) + SHAPE), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
  ]
  masks = pruning.prune(
    pruner,
    key=jax.random.key(0),
    model=_fn_model,
    variables=params,
    sparsity=0.7,
    pruning_type="effective",
    input_shape=SHAPE,
    batches=batches,
    trained_params=params,
    loss=_fn_loss,
    rounds=FAST.get(pruner),
  )
  assert effective.effective_sparsity(_fn_model, masks, SHAPE, params=params) >= 0.7


def test_data_pruners_on_a_function_need_a_loss():
  with pytest.raises(ValueError, match="needs loss="):
    pruning.prune(
      "snip",
      key=jax.random.key(0),
      model=_fn_model,
      variables=_fn_params(),
      sparsity=0.5,
      input_shape=SHAPE,
      batches=[{"x": jnp.ones((2,) + SHAPE)}],
    )


def test_snip_user_loss_equals_default_loss():
  model = FlaxCNN()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(params, batch):
    logits, _ = model.apply(
      {"params": params, **rest}, batch["image"], train=True, mutable=["batch_stats"]
    )
    return scores.cross_entropy(logits, batch["label"])

  a = scores.snip(model, variables, _batches())
  # without a model, the prunable set is given as paths (the traced linear-op weights)
  prunable = sparsejax.trace(model, SHAPE, variables=variables).prunable_paths
  b = scores.snip(None, variables, _batches(), loss=loss, prunable=prunable)
  for x, y in zip(masks_lib.mask_leaves(a), masks_lib.mask_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)


# ------------------------------------------------- the prunable set beyond the name rule


def _named_fn(params, x):
  """A user function whose weights are not called 'kernel': conv 'cw', dense 'w_out'."""
  h = jax.lax.conv_general_dilated(
    x, params["cw"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jax.nn.relu(h + params["cb"])
  h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  return h.reshape(h.shape[0], -1) @ params["w_out"] + params["b_out"]


def _named_params():
  rng = np.random.default_rng(5)
  return {
    "cw": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32),
    "cb": jnp.zeros(4, jnp.float32),
    "w_out": jnp.asarray(rng.normal(size=(36, 3)), jnp.float32),
    "b_out": jnp.zeros(3, jnp.float32),
  }


def _named_loss(params, batch):
  return jnp.mean((_named_fn(params, batch["x"]) - batch["y"]) ** 2)


@pytest.mark.parametrize(
  "pruner",
  [
    "random/uniform_plus",
    "random/igq",
    "random/snip",
    "magnitude/erk",
    "lamp",
    "snip",
    "snip/iterative",
    "grasp",
    "synflow",
  ],
)
def test_every_pruner_prunes_weights_not_named_kernel(pruner):
  params = _named_params()
  rng = np.random.default_rng(6)
  batches = [
    {
      "x": jnp.asarray(rng.normal(size=(4,) + SHAPE), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
    }
  ]
  kw = dict(
    key=jax.random.key(0),
    model=_named_fn,
    variables=params,
    input_shape=SHAPE,
    batches=batches,
    trained_params=params,
    loss=_named_loss,
    rounds=FAST.get(pruner),
  )
  direct = pruning.prune(pruner, sparsity=0.5, **kw)
  assert direct["cb"] is None and direct["b_out"] is None
  assert masks_lib.count(direct, params) == (72, 36 + 108)  # cw and w_out
  eff = pruning.prune(pruner, sparsity=0.5, pruning_type="effective", **kw)
  assert effective.effective_sparsity(_named_fn, eff, SHAPE, params=params) >= 0.5


@pytest.mark.parametrize("pruner", ["random/erk", "magnitude/global", "snip", "synflow"])
def test_a_prunable_predicate_keeps_chosen_layers_dense(pruner):
  model = FlaxCNN()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  keep_ends = lambda path: path not in ("conv1/kernel", "head/kernel")
  kw = dict(
    key=jax.random.key(2),
    model=model,
    variables=variables,
    input_shape=SHAPE,
    batches=_batches(),
    trained_params=variables["params"],
    rounds=FAST.get(pruner),
    prunable=keep_ends,
  )
  m = pruning.prune(pruner, sparsity=0.7, **kw)
  assert m["conv1"]["kernel"] is None and m["head"]["kernel"] is None
  assert masks_lib.count(m) == (round(0.3 * 216), 216)  # conv2 alone: 3*3*4*6
  eff = pruning.prune(pruner, sparsity=0.7, pruning_type="effective", **kw)
  assert eff["conv1"]["kernel"] is None and eff["head"]["kernel"] is None
  # the mask tree is the prunable set: a layer left None is not pruned and not counted
  assert effective.effective_sparsity(model, eff, SHAPE, variables=variables) >= 0.7
  # an unpruned layer is an unmasked one: the same active weights as a True mask there
  full = dict(
    eff,
    conv1=dict(eff["conv1"], kernel=jnp.ones((3, 3, 1, 4), bool)),
    head=dict(eff["head"], kernel=jnp.ones(variables["params"]["head"]["kernel"].shape, bool)),
  )
  a = effective.effective_masks(model, eff, SHAPE, variables=variables)
  b = effective.effective_masks(model, full, SHAPE, variables=variables)
  assert a["conv1"]["kernel"] is None and a["head"]["kernel"] is None
  np.testing.assert_array_equal(a["conv2"]["kernel"], b["conv2"]["kernel"])
  # ... and the sparsity counts conv2 alone
  active = int(np.sum(np.asarray(b["conv2"]["kernel"])))
  assert effective.effective_sparsity(model, eff, SHAPE, variables=variables) == pytest.approx(
    1 - active / 216
  )


def test_masks_of_a_user_function_train_with_the_optax_wrapper():
  import optax  # pylint: disable=g-import-not-at-top

  from sparsejax import optim  # pylint: disable=g-import-not-at-top

  params = _named_params()
  m = pruning.prune(
    "random/igq",
    key=jax.random.key(1),
    model=_named_fn,
    variables=params,
    sparsity=0.8,
    input_shape=SHAPE,
  )
  tx = optim.with_masks(optax.adam(1e-2), m)
  params = masks_lib.apply(params, m)
  state = tx.init(params)
  batch = {"x": jnp.ones((2,) + SHAPE), "y": jnp.ones((2, 3))}
  for _ in range(3):
    grads = jax.grad(_named_loss)(params, batch)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for name in ("cw", "w_out"):
    assert not np.any(np.asarray(params[name])[~np.asarray(m[name])])
  assert np.any(np.asarray(params["cb"]) != 0)  # biases train


def test_bad_prunable_and_foreign_score_trees():
  params = _named_params()
  with pytest.raises(ValueError, match="prunable=3 must be a collection of '/'-joined"):
    pruning.prune(
      "random/igq",
      key=jax.random.key(0),
      model=_named_fn,
      variables=params,
      sparsity=0.5,
      input_shape=SHAPE,
      prunable=3,
    )
  with pytest.raises(ValueError, match=r"prunable selects \['cb'\]"):
    pruning.prune(
      "random/igq",
      key=jax.random.key(0),
      model=_named_fn,
      variables=params,
      sparsity=0.5,
      input_shape=SHAPE,
      prunable=["cb", "cw"],
    )
  # a pruner that scores every leaf instead of ScoreContext.prunable (biases too)
  wrong = pruning.Pruner("toy/every_leaf", lambda c: jax.tree.map(jnp.abs, c.params), "erk")
  with pytest.raises(ValueError, match="scored.*ScoreContext.prunable"):
    pruning.prune(
      wrong,
      key=jax.random.key(0),
      model=_named_fn,
      variables=params,
      sparsity=0.5,
      input_shape=SHAPE,
    )


class PlainMLP(nn.Module):
  """A Flax model whose __call__ takes no ``train`` argument."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


@pytest.mark.parametrize("pruner", ["snip", "grasp"])
def test_data_pruners_on_a_model_without_a_train_argument(pruner):
  model = PlainMLP()
  variables = model.init(jax.random.key(0), jnp.ones((1,) + SHAPE))
  m = pruning.prune(
    pruner,
    key=jax.random.key(1),
    model=model,
    variables=variables,
    sparsity=0.8,
    pruning_type="effective",
    input_shape=SHAPE,
    batches=_batches(),
  )
  assert effective.effective_sparsity(model, m, SHAPE, variables=variables) >= 0.8
