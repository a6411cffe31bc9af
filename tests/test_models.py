"""The model zoo: prunable counts, layer order, layouts, registry errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import masks, models
from sparsejax.models import layers as L

# (name, input shape, classes, prunable weights, prunable layers) from method.md section 5.
ZOO = [
  ("lenet300100", (28, 28, 1), 10, 266_200, 3),
  ("lenet5", (32, 32, 3), 10, 61_770, 5),
  ("vgg16", (32, 32, 3), 10, 14_715_584, 14),
  ("vgg19", (32, 32, 3), 100, 20_070_080, 17),
  ("resnet18", (64, 64, 3), 200, 11_261_632, 21),
]


def shapes_of(model, input_shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1,) + input_shape))


@pytest.mark.parametrize("name,input_shape,classes,count,layers", ZOO)
def test_prunable_weight_counts(name, input_shape, classes, count, layers):
  dense = sparsejax.trace(models.create(name, classes), input_shape).ones()
  shapes = [m.shape for m in masks.mask_leaves(dense)]
  assert sum(int(np.prod(s)) for s in shapes) == count
  assert len(shapes) == layers


def call_order(model, input_shape):
  """Prunable layers in the order they are called (traced with intercept_methods)."""
  order = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (nn.Dense, nn.Conv)) and context.method_name == "__call__":
      path = "/".join(context.module.path) + "/kernel"
      if path not in order:
        order.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1,) + input_shape))
  return order


@pytest.mark.parametrize("name,input_shape,classes,count,layers", ZOO)
def test_tree_order_is_input_to_output_order(name, input_shape, classes, count, layers):
  model = models.create(name, classes)
  traced = sparsejax.trace(model, input_shape)
  assert masks.paths(traced.ones()) == call_order(model, input_shape)  # tree order
  assert traced.prunable_paths == call_order(model, input_shape)  # traced data-flow order


@pytest.mark.parametrize("name,input_shape,classes,count,layers", ZOO)
def test_output_shapes(name, input_shape, classes, count, layers):
  model = models.create(name, classes)
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), jnp.ones((2,) + input_shape))[0]
  )
  assert out.shape == (2, classes)


def test_kernel_layouts_and_initializer():
  params = models.create("lenet5").init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))["params"]
  assert params["conv_0"]["kernel"].shape == (5, 5, 3, 6)  # HWIO
  assert params["dense_2"]["kernel"].shape == (400, 120)  # (in, out), flatten of 5x5x16
  assert not np.any(params["conv_0"]["bias"])  # biases start at zero
  # Variance scaling, scale 2, fan_avg, normal: var = 2 / ((fan_in + fan_out) / 2).
  big = models.create("vgg19").init(jax.random.key(1), jnp.ones((1, 32, 32, 3)))["params"]
  w = np.asarray(big["conv_10"]["kernel"])
  fan_in, fan_out = 9 * 512, 9 * 512
  assert np.var(w) == pytest.approx(2.0 / ((fan_in + fan_out) / 2), rel=0.03)


def test_batch_norm_placement_and_biases():
  p300 = shapes_of(models.create("lenet300100"), (28, 28, 1))
  assert set(p300["params"]) == {f"dense_{i}" for i in range(3)} | {f"norm_{i}" for i in range(3)}
  res = shapes_of(models.create("resnet18"), (64, 64, 3))["params"]
  assert "bias" not in res["stage0_conv"] and "bias" not in res["stage5_dense"]
  assert "shortcut_conv" not in res["stage1_block0"]  # same shape: identity shortcut
  for stage in (2, 3, 4):
    assert res[f"stage{stage}_block0"]["shortcut_conv"]["kernel"].shape[:2] == (1, 1)
    assert "shortcut_conv" not in res[f"stage{stage}_block1"]


def test_same_padding_is_xla_same():
  """Stride 2 on an even size pads the extra row/column at the bottom/right."""
  conv = L.Conv(1, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 1))
  variables = conv.init(jax.random.key(1), x)
  w = variables["params"]["kernel"]
  want = jax.lax.conv_general_dilated(
    x, w, (2, 2), ((0, 1), (0, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(conv.apply(variables, x), want, rtol=1e-6)


@pytest.mark.parametrize(
  "shape,kernel,strides,padding,dilation,prepadded",
  [
    ((2, 2, 2, 5), (3, 3), 1, "SAME", 1, True),  # VGG's last block: pad 2 >= size 2
    ((2, 1, 1, 4), (3, 3), 1, "SAME", 1, True),
    ((2, 2, 3, 3), (5, 5), 1, "SAME", 1, True),
    ((2, 2, 2, 3), (3, 3), 1, "SAME", 2, True),  # dilated kernel: pad 4
    ((2, 2, 2, 3), (3, 3), 1, ((1, 1), (1, 1)), 1, True),
    ((2, 3, 3, 3), (3, 3), 2, "SAME", 1, False),  # pad 2 < size 3
    ((1, 4, 4, 3), (3, 3), 1, "SAME", 1, False),
    ((2, 5, 5, 3), (3, 3), 1, "VALID", 1, False),
  ],
)
def test_conv_pads_beforehand_only_where_padding_covers_the_input(
  shape, kernel, strides, padding, dilation, prepadded
):
  """L.Conv == nn.Conv (outputs and gradients); the input is padded beforehand (a `pad`
  behind an optimization barrier, then 'VALID') exactly when some axis's padding is at
  least its size (XLA:CPU's slow path, see layers.conv_general_dilated)."""
  x = jax.random.normal(jax.random.key(0), shape)
  ours = L.Conv(6, kernel, strides=strides, padding=padding, kernel_dilation=dilation)
  flax_conv = nn.Conv(6, kernel, strides=strides, padding=padding, kernel_dilation=dilation)
  variables = ours.init(jax.random.key(1), x)
  np.testing.assert_allclose(
    ours.apply(variables, x), flax_conv.apply(variables, x), rtol=1e-5, atol=1e-5
  )
  loss = lambda m: jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))
  for a, b in zip(
    jax.tree.leaves(loss(ours)(variables, x)), jax.tree.leaves(loss(flax_conv)(variables, x))
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  prims = {e.primitive.name for e in jax.make_jaxpr(ours.apply)(variables, x).eqns}
  assert ("optimization_barrier" in prims) == prepadded
  assert ("pad" in prims) == prepadded


def test_zoo_models_are_plain_flax_modules():
  """No modes: effective masks and SynFlow transform the traced program instead."""
  for name in models.MODELS:
    model = models.create(name)
    assert not hasattr(model, "mode")
    assert not hasattr(L, "gate") and not hasattr(L, "MODES")


def test_registry_errors():
  with pytest.raises(ValueError, match="name='alexnet'.*allowed: lenet300100"):
    models.create("alexnet")
  with pytest.raises(ValueError, match="num_classes=0"):
    models.create("lenet5", 0)
  with pytest.raises(ValueError, match="kind='median'"):
    L.pool(jnp.ones((1, 4, 4, 1)), "median", 2)


class _TinyMLP(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(self.num_classes)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def test_the_zoo_registers_its_networks_in_the_papers_order():
  assert list(models.MODELS)[:5] == [name for name, *_ in ZOO]
  for name, input_shape, classes, *_ in ZOO:
    spec = models.get_spec(name)
    assert (spec.input_shape, spec.num_classes) == (input_shape, classes)
    assert models.input_shape(name) == input_shape


def test_a_registered_network_is_created_like_the_zoos():
  spec = models.ModelSpec(_TinyMLP, {}, "mnist", (28, 28, 1), 10)
  try:
    assert models.register_model("tiny_mlp", spec) is spec
    model = models.create("tiny_mlp", 3)
    assert isinstance(model, _TinyMLP) and model.num_classes == 3
    assert shapes_of(model, (28, 28, 1))["params"]["Dense_0"]["kernel"].shape == (
      8,
      3,
    )  # the outer Dense
    with pytest.raises(ValueError, match="name='tiny_mlp' is already registered"):
      models.register_model("tiny_mlp", spec)
  finally:
    models.MODELS.pop("tiny_mlp", None)
  assert "tiny_mlp" not in models.MODELS


@pytest.mark.parametrize(
  "name,fields,match",
  [
    ("", {}, "name=''"),
    ("a/b", {}, "name='a/b'"),
    ("ok", dict(build="MLP"), "spec.build='MLP' is not callable"),
    ("ok", dict(kwargs=[]), "spec.kwargs=\\[\\]"),
    ("ok", dict(dataset=""), "spec.dataset=''"),
    ("ok", dict(input_shape=[28, 28, 1]), "spec.input_shape=\\[28, 28, 1\\]"),
    ("ok", dict(input_shape=(28, 0)), "spec.input_shape=\\(28, 0\\)"),
    ("ok", dict(num_classes=0), "spec.num_classes=0"),
  ],
)
def test_register_model_names_a_bad_argument(name, fields, match):
  spec = dict(build=_TinyMLP, kwargs={}, dataset="mnist", input_shape=(28, 28, 1), num_classes=10)
  with pytest.raises(ValueError, match=match):
    models.register_model(name, models.ModelSpec(**{**spec, **fields}))
  assert name not in models.MODELS
