"""Compile once: counted compilations of init, scores, the connectivity program and the
search; the experiment binaries' persistent compilation cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from experiments import compilation_cache
from sparsejax import _jax_compat, compilation, effective, masks, models, pruning, scores


def _sweep_programs(log):
  return [n for n in log.names if "sweep" in n]


def test_compile_log_counts_programs():
  f = compilation.jit(lambda x: x * 3 + 1)
  x = jnp.arange(5.0)
  with compilation.CompileLog() as log:
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x) * 3 + 1)
    f(x + 1)
  assert log.count >= 1 and log.seconds > 0
  with compilation.CompileLog() as again:
    f(x)
  assert again.count == 0
  # nested in other transformations it is inlined (compiler options are top-level only)
  np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(f(x)))
  np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), np.asarray(f(x)))


def test_trace_state_is_read_from_jax():
  """compilation.jit passes its CPU options only outside every trace; the compat
  module's fallback (False everywhere, if JAX moved its internal) fails here."""
  seen = []
  probe = lambda x: seen.append(_jax_compat.trace_state_clean()) or x
  assert _jax_compat.trace_state_clean()
  jax.jit(probe)(1.0)
  jax.vmap(probe)(jnp.ones(2))
  jax.grad(probe)(1.0)
  assert seen == [False, False, False]
  f = compilation.jit(lambda x: x + 1)
  f(jnp.ones(3))
  top = f.cpu if jax.default_backend() == "cpu" else f.plain
  assert top._cache_size() == 1  # pylint: disable=protected-access


def test_jit_on_cpu_options_gives_the_same_values():
  fn = lambda x: jnp.tanh(x) * jnp.exp(-x * x) + jnp.sqrt(jnp.abs(x))
  x = jax.random.normal(jax.random.key(0), (1000,))
  f = compilation.jit(fn)
  np.testing.assert_allclose(np.asarray(f(x)), np.asarray(jax.jit(fn)(x)), rtol=1e-6, atol=1e-7)


def test_model_init_is_one_program_matching_flax_init():
  model = models.create("lenet5", num_classes=9)  # a model no other test compiles
  want = model.init(jax.random.key(4), jnp.ones((1, 32, 32, 3)))
  with compilation.CompileLog() as log:
    got = models.init(model, jax.random.key(4), (32, 32, 3))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert log.count == 1, log.names  # eager model.init compiles every op on its own
  with compilation.CompileLog() as again:
    models.init(model, jax.random.key(5), (32, 32, 3))
  assert again.count == 0
  with pytest.raises(ValueError, match="input_shape"):
    models.init(model, jax.random.key(5), (32, 0, 3))


def test_random_scores_are_one_program_and_unchanged():
  model = models.create("lenet5", num_classes=11)
  params = models.init(model, jax.random.key(0), (32, 32, 3))["params"]
  DENSE = [sparsejax.trace(model, (32, 32, 3)).ones()]
  with compilation.CompileLog() as log:
    s = scores.random(params, key=jax.random.key(3), prunable=masks.paths(DENSE[0]))
  assert log.count == 1, log.names
  # the draws as they were: layer l draws from the l-th of split(key, L)
  keys = jax.random.split(jax.random.key(3), 5)
  for k, leaf in zip(keys, masks.mask_leaves(s)):
    want = (jax.random.bits(k, leaf.shape, jnp.uint32) >> 1).astype(jnp.int32)
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def test_one_connectivity_program_serves_search_masks_and_units():
  model = models.create("lenet300100", num_classes=7)
  shape = (28, 28, 1)
  variables = models.init(model, jax.random.key(0), shape)
  kw = dict(
    key=jax.random.key(1),
    model=model,
    variables=variables,
    input_shape=shape,
    pruning_type="effective",
  )
  with compilation.CompileLog() as log:
    m = pruning.prune("random/uniform", sparsity=0.99, **kw)
    eff = effective.effective_masks(model, m, shape, variables=variables)
    effective.active_units(model, m, shape, variables=variables)
  assert len(_sweep_programs(log)) == 1, log.names
  assert masks.count(eff)[0] <= pruning.max_kept_for_sparsity(0.99, masks.count(m)[1])
  # Another seed, quota and target: the same programs, nothing compiled.
  with compilation.CompileLog() as again:
    pruning.prune("random/uniform", sparsity=0.999, **dict(kw, key=jax.random.key(2)))
    pruning.prune("random/uniform", sparsity=0.9, **dict(kw, pruning_type="direct"))
  assert again.count == 0, again.names


def test_binaries_turn_the_persistent_cache_on_only_when_asked(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compilation_cache.default_dir() == str(tmp_path / "xdg" / "sparsejax" / "jax")
  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  saved = {n: getattr(jax.config, n) for n in names}
  before = saved["jax_compilation_cache_dir"]
  try:
    assert compilation_cache.enable("", True) is None
    assert compilation_cache.enable(str(tmp_path / "c"), False) is None
    assert jax.config.jax_compilation_cache_dir == before
    got = compilation_cache.enable(str(tmp_path / "c"), True)
    assert got == str(tmp_path / "c") and os.path.isdir(got)
    assert jax.config.jax_compilation_cache_dir == got
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="compilation_cache_dir"):
      compilation_cache.enable(str(blocker / "sub"), True)
  finally:
    for n, value in saved.items():  # as before (the suite's own cache, see conftest)
      jax.config.update(n, value)
