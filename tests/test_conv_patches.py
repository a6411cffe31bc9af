"""The sweep's convolutions as patches-times-kernel products, and XLA's convolution with
the patches kernel gradient, equal XLA's convolution, values and both gradients, for
any strides, padding, rhs dilation and layout (sparsejax.connectivity.xla_cpu); the
semantics reach them through one hook."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from sparsejax.connectivity import program, sweeps, xla_cpu


def _conv_eqn(x, w, **kw):
  jaxpr = jax.make_jaxpr(lambda a, b: lax.conv_general_dilated(a, b, **kw))(x, w)
  (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  return program.Eqn(eqn.primitive, dict(eqn.params), [], [], "x", "", [])


@settings(max_examples=15, deadline=None)
@given(
  nsp=st.sampled_from([1, 2]),
  size=st.integers(1, 6),
  k=st.integers(1, 3),
  stride=st.integers(1, 3),
  dil=st.integers(1, 2),
  cin=st.integers(1, 3),
  cout=st.integers(1, 3),
  batch=st.integers(1, 2),
  pad=st.sampled_from(["SAME", "VALID", ((1, 0),), ((2, 1),), ((0, -1),)]),
  channels_last=st.booleans(),
  seed=st.integers(0, 2**16),
)
def test_patches_equal_the_convolution_and_its_gradients(
  nsp, size, k, stride, dil, cin, cout, batch, pad, channels_last, seed
):
  if isinstance(pad, tuple):
    pad = pad * nsp
  lhs = "N" + "HW"[:nsp] + "C" if channels_last else "NC" + "HW"[:nsp]
  rhs = "HW"[:nsp] + "IO" if channels_last else "OI" + "HW"[:nsp]
  dn = (lhs, rhs, lhs)
  xs = [batch] + [size] * nsp + [cin] if channels_last else [batch, cin] + [size] * nsp
  ws = [k] * nsp + [cin, cout] if channels_last else [cout, cin] + [k] * nsp
  keys = jax.random.split(jax.random.key(seed), 3)
  x = (jax.random.uniform(keys[0], xs) > 0.4).astype(jnp.float32)
  w = (jax.random.uniform(keys[1], ws) > 0.5).astype(jnp.float32)
  kw = dict(
    window_strides=(stride,) * nsp, padding=pad, rhs_dilation=(dil,) * nsp, dimension_numbers=dn
  )
  try:
    want, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **kw), x, w)
  except (TypeError, ValueError):  # an empty output: nothing to compare
    return
  e = _conv_eqn(x, w, **kw)
  got = xla_cpu.conv_as_patches(e, x, w, max_positions=10**6)
  if want.size == 0:
    return
  assert got is not None
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  g = (jax.random.uniform(keys[2], want.shape) > 0.5).astype(jnp.float32)
  got_vjp = jax.vjp(lambda a, b: xla_cpu.conv_as_patches(e, a, b, 10**6), x, w)[1](g)
  for a, b in zip(got_vjp, vjp(g)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got, got_vjp = jax.jit(
    lambda a, b: jax.vjp(lambda a, b: xla_cpu.conv_patches_kernel_grad(e, a, b), a, b)
  )(x, w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for a, b in zip(got_vjp(g), vjp(g)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_patches_decline_what_they_do_not_cover():
  x = jnp.ones((1, 4, 4, 4))
  w = jnp.ones((3, 3, 2, 4))
  grouped = _conv_eqn(
    x,
    w,
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=2,
  )
  assert xla_cpu.conv_as_patches(grouped, x, w) is None
  w = jnp.ones((3, 3, 4, 4))
  plain = _conv_eqn(
    x, w, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  assert xla_cpu.conv_as_patches(plain, x, w, max_positions=15) is None
  assert xla_cpu.conv_as_patches(plain, x, w, max_positions=16) is not None


def test_patches_kernel_grad_falls_back_to_xla_where_patches_do_not_apply():
  """Grouped convolutions keep XLA's own gradients, equal to the plain vjp."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = (jax.random.uniform(keys[0], (1, 5, 5, 4)) > 0.5).astype(jnp.float32)
  w = (jax.random.uniform(keys[1], (3, 3, 2, 4)) > 0.5).astype(jnp.float32)
  kw = dict(
    window_strides=(1, 1),
    padding="SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=2,
  )
  want, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **kw), x, w)
  e = _conv_eqn(x, w, **kw)
  got, got_vjp = jax.vjp(lambda a, b: xla_cpu.conv_patches_kernel_grad(e, a, b), x, w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  g = (jax.random.uniform(keys[2], want.shape) > 0.5).astype(jnp.float32)
  for a, b in zip(got_vjp(g), vjp(g)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_semantics_reach_the_kernels_through_one_hook(monkeypatch):
  """The reachability sweep asks xla_cpu.reach_linear for each linear op on the input
  (the hook benchmarks.effective wraps, looked up at each call), and its result is the
  same whichever kernel the thresholds pick: patches, XLA's convolution with the
  patches kernel gradient, or XLA's alone."""

  def fn(params, extra, x):
    del extra
    dn = ("NHWC", "HWIO", "NHWC")
    h = lax.conv_general_dilated(x, params["c"], (1, 1), "SAME", dimension_numbers=dn)
    return jnp.maximum(h, 0).reshape(h.shape[0], -1) @ params["d"]

  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  prog = program.build(fn, {"c": f32(3, 3, 2, 4), "d": f32(64, 3)}, {}, f32(1, 4, 4, 2))
  prunable = list(prog.weight_leaves)
  keys = jax.random.split(jax.random.key(0), len(prunable))
  masks = [jax.random.uniform(k, prog.param_shapes[i]) > 0.6 for k, i in zip(keys, prunable)]
  masks[0] = masks[0].at[..., 0].set(False)  # conv channel 0 cut: its dense rows are dead
  seen, hook = [], xla_cpu.reach_linear
  monkeypatch.setattr(
    xla_cpu, "reach_linear", lambda e, x, w: seen.append(e.prim.name) or hook(e, x, w)
  )
  want = jax.tree.leaves(sweeps.reach_sweep(prog, prunable)(masks))
  assert sorted(seen) == ["conv_general_dilated", "dot_general"]
  assert not bool(jnp.any(want[1].reshape(16, 4, 3)[:, 0]))  # potential of the dead rows
  assert bool(jnp.any(want[1]))
  monkeypatch.setattr(xla_cpu, "MAX_POSITIONS", 0)  # XLA's convolution, patches kernel grad
  kernel_grad = jax.tree.leaves(sweeps.reach_sweep(prog, prunable)(masks))
  monkeypatch.setattr(xla_cpu, "MAX_KERNEL_GRAD_PATCHES", 0)  # XLA's alone
  plain = jax.tree.leaves(sweeps.reach_sweep(prog, prunable)(masks))
  for got in (kernel_grad, plain):
    assert len(got) == len(want)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
