"""The zoo's transformers (issue 25): the ViT and the byte-level GPT trace, their prunable
sets are the linear-op weights one expects, they compute what they say (causal, patch
embeddings), and every registered unstructured pruner runs on both."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import effective, errors, models, pruning, scores
from sparsejax import masks as masks_lib

TOKENS = jax.ShapeDtypeStruct((1, 16), jnp.int32)


def tiny_vit(**kw):
  return models.ViT(**{"width": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, **kw})


def tiny_gpt(**kw):
  return models.GPT(**{"context": 16, "width": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, **kw})


def block_paths(depth):
  return [
    f"block_{i}/{name}/kernel"
    for i in range(depth)
    for name in ("attention/query", "attention/key", "attention/value", "attention/out")
    + ("mlp/fc", "mlp/proj")
  ]


def test_the_zoo_creates_both_by_name_with_their_inputs():
  vit, gpt = models.create("vit"), models.create("gpt")
  assert isinstance(vit, models.ViT) and (vit.patch, vit.width, vit.depth, vit.heads) == (
    7,
    64,
    4,
    4,
  )
  assert isinstance(gpt, models.GPT) and gpt.vocab_size == 256 and not gpt.tied
  assert (gpt.context, gpt.width, gpt.depth, gpt.heads) == (128, 128, 4, 4)
  assert models.get_spec("vit").dataset == "mnist" and models.get_spec("gpt").dataset == "text"
  assert models.example_input("vit", 3) == jax.ShapeDtypeStruct((3, 28, 28, 1), jnp.float32)
  assert models.example_input("gpt") == jax.ShapeDtypeStruct((1, 128), jnp.int32)
  assert models.GPT(**models.gpt.LARGE).context == 256
  counts = {
    n: sum(x.size for x in jax.tree.leaves(jax.eval_shape(m.init, jax.random.key(0), ex)))
    for n, m, ex in (
      ("vit", vit, models.example_input("vit")),
      ("gpt", gpt, models.example_input("gpt")),
      ("large", models.GPT(**models.gpt.LARGE), jax.ShapeDtypeStruct((1, 256), jnp.int32)),
    )
  }
  assert counts == {"vit": 205_066, "gpt": 875_264, "large": 4_935_680}  # the docstrings'


@pytest.mark.parametrize("embedding", ["conv", "dense"])
def test_the_vits_prunable_set_is_patch_embedding_projections_mlp_and_head(embedding):
  model = tiny_vit(patch_embedding=embedding)
  v = models.init(model, jax.random.key(0), (28, 28, 1))
  traced = sparsejax.trace(model, (28, 28, 1), variables=v)
  assert traced.prunable_paths == ["embed/kernel", *block_paths(2), "head/kernel"]
  # class token, positions, biases and LayerNorms are no linear-op weights
  assert set(v["params"]) >= {"cls", "pos_embed", "norm"}


def test_the_vits_two_patch_embeddings_compute_the_same_function():
  conv, dense = tiny_vit(patch_embedding="conv"), tiny_vit(patch_embedding="dense")
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  v = conv.init(jax.random.key(0), x)
  params = dict(v["params"])
  params["embed"] = {
    "kernel": params["embed"]["kernel"].reshape(-1, 16),  # [p, p, C, W] -> [p p C, W]
    "bias": params["embed"]["bias"],
  }
  np.testing.assert_allclose(
    conv.apply(v, x), dense.apply({"params": params}, x), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("tied", [False, True])
def test_the_gpts_prunable_set_is_embedding_projections_mlp_and_head(tied):
  model = tiny_gpt(tied=tied)
  v = models.init(model, jax.random.key(0), TOKENS)
  traced = sparsejax.trace(model, TOKENS, variables=v)
  head = [] if tied else ["head/kernel"]
  assert traced.prunable_paths == ["embed/embedding", *block_paths(2), *head]
  m = traced.ones()
  assert m["pos_embed"] is None and m["norm"]["scale"] is None
  if tied:  # one leaf, one mask, used as the input and the output embedding
    assert "head" not in v["params"]
    m["embed"]["embedding"] = m["embed"]["embedding"].at[:, 0].set(False)
    eff = effective.effective_masks(traced, m)
    assert int(eff["embed"]["embedding"].sum()) == 256 * 15


def test_the_gpt_is_causal_and_predicts_every_position():
  model = tiny_gpt()
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
  v = model.init(jax.random.key(0), tokens)
  logits = model.apply(v, tokens)
  assert logits.shape == (2, 16, 256)
  changed = model.apply(v, tokens.at[:, 9].set((tokens[:, 9] + 1) % 256))
  np.testing.assert_allclose(logits[:, :9], changed[:, :9], rtol=1e-6, atol=1e-6)
  assert not np.allclose(logits[:, 9:], changed[:, 9:])
  # shorter inputs read the first positions only
  np.testing.assert_allclose(model.apply(v, tokens[:, :5]), logits[:, :5], rtol=1e-5, atol=1e-5)


def test_bad_sizes_are_named():
  with pytest.raises(ValueError, match="heads=3 must be a positive integer that divides"):
    tiny_gpt(heads=3).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"length <= context=16"):
    tiny_gpt().init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="patch=5 must divide"):
    tiny_vit(patch=5).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="patch_embedding='linear'"):
    tiny_vit(patch_embedding="linear").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="pool='max'"):
    tiny_vit(pool="max").init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="spec.input_dtype='text'"):
    models.register_model(
      "bad_dtype", models.ModelSpec(models.GPT, {}, "text", (8,), 256, input_dtype="text")
    )
  assert "bad_dtype" not in models.MODELS


def test_default_losses_of_token_batches_are_next_token_cross_entropy():
  model = tiny_gpt(depth=1)
  v = models.init(model, jax.random.key(0), TOKENS)
  tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, 256)
  s = scores.snip(model, v, [{"tokens": tokens}])

  def loss(params, batch):
    logits = model.apply({"params": params}, batch["tokens"][:, :-1])
    return scores.data.cross_entropy(logits, batch["tokens"][:, 1:])

  expected = scores.snip(model, v, [{"tokens": tokens}], loss=loss, prunable=masks_lib.paths(s))
  for a, b in zip(masks_lib.mask_leaves(s), masks_lib.mask_leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert all(float(jnp.max(a)) > 0 for a in masks_lib.mask_leaves(s))
  with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 256\)"):
    scores.snip(model, v, [{"tokens": tokens.at[0, 0].set(300)}])
  with pytest.raises(ValueError, match=r"'tokens' as integer ids \[B, T \+ 1\]"):
    scores.snip(model, v, [{"tokens": tokens.astype(jnp.float32)}])
  classifier = TokenClassifier()  # token ids in, one prediction per sequence out
  v = models.init(classifier, jax.random.key(0), TOKENS)
  with pytest.raises(ValueError, match=r"needs logits \[B, T, vocab\].*Pass loss="):
    scores.snip(classifier, v, [{"tokens": tokens}])


class TokenClassifier(nn.Module):
  @nn.compact
  def __call__(self, tokens, train=False):
    return nn.Dense(10)(nn.Embed(256, 8)(tokens).mean(axis=1))


def test_synflow_scores_the_vit_with_mean_pooling():
  model = tiny_vit(pool="gap")
  v = models.init(model, jax.random.key(0), (28, 28, 1))
  traced = sparsejax.trace(model, (28, 28, 1), variables=v)
  s = scores.synflow_scores(traced, v)
  assert all(float(jnp.sum(a)) > 0 for a in masks_lib.mask_leaves(s))
  m = sparsejax.prune(
    "synflow", key=jax.random.key(1), model=traced, variables=v, sparsity=0.9, rounds=3
  )
  assert np.isfinite(effective.effective_compression(traced, m))


def test_synflow_scores_the_vit_with_a_class_token():
  model = tiny_vit()
  v = models.init(model, jax.random.key(0), (28, 28, 1))
  s = scores.synflow_scores(sparsejax.trace(model, (28, 28, 1), variables=v), v)
  assert all(float(jnp.sum(a)) > 0 for a in masks_lib.mask_leaves(s))


# ------------------------------------------------------------------ every pruner

UNSTRUCTURED = [
  n for n, p in sparsejax.PRUNERS.items() if p.kind == "weights" and p.score is not None
]
# Three pruners per transformer run by default (a quota ranking, a data-driven score and
# SynFlow's linearization); the rest of the grid on request: pytest -m exhaustive.
DEFAULT_PRUNERS = ("random/igq", "snip", "synflow")
CASES = [
  pytest.param(
    arch,
    name,
    pruning_type,
    marks=() if name in DEFAULT_PRUNERS else pytest.mark.exhaustive,
    id=f"{arch}-{name}-{pruning_type}",
  )
  for arch in ("vit", "gpt")
  for name in UNSTRUCTURED
  for pruning_type in ("direct", "effective")
]


#: Global rankings of weight magnitudes that these tests apply to *initial* weights (their
#: scores are meant for trained ones): the blocks' kernels start at normal(0.02), the
#: patch embedding and the head larger, so at 10x the ranking may empty whole block
#: layers; the network then disconnects (direct) or no connected member reaches 10x
#: effective (UnreachableSparsityError with the reachable sparsity). Both are right.
GLOBAL_ON_INIT_WEIGHTS = {
  "magnitude/global",
  "obd",
  "block/4x4/mean",
  "block/4x4/max",
  "block/8x8/mean",
  "block/8x8/max",
}


@pytest.fixture(scope="module")
def tiny_models():
  rng = np.random.default_rng(0)
  out = {}
  vit = tiny_vit()
  v = models.init(vit, jax.random.key(0), (28, 28, 1))
  images = [
    {
      "image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
      "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    for _ in range(2)
  ]
  out["vit"] = (sparsejax.trace(vit, (28, 28, 1), variables=v), v, images)
  gpt = tiny_gpt()
  v = models.init(gpt, jax.random.key(0), TOKENS)
  tokens = [{"tokens": rng.integers(0, 256, (8, 17)).astype(np.int32)} for _ in range(2)]
  out["gpt"] = (sparsejax.trace(gpt, TOKENS, variables=v), v, tokens)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("arch,name,pruning_type", CASES)
def test_every_registered_pruner_prunes_both_transformers(tiny_models, arch, name, pruning_type):
  traced, v, batches = tiny_models[arch]
  p = sparsejax.get_pruner(name)
  kw = dict(
    key=jax.random.key(1),
    model=traced,
    variables=v,
    sparsity=0.9,
    pruning_type=pruning_type,
    batches=batches,
    trained_params=v["params"],
    rounds=3 if p.iterative else None,
  )
  if p.quota == "uniform_plus":
    if arch == "gpt":  # no convolution: uniform_plus has no first layer to keep dense
      with pytest.raises(ValueError, match="uniform_plus needs a convolutional network"):
        sparsejax.prune(name, **kw)
    else:  # the ViT's patch embedding (a conv) stays dense and the head >= 20% dense
      with pytest.raises(
        errors.UnreachableSparsityError, match="largest reachable sparsity is 0.83"
      ):
        sparsejax.prune(name, **kw)
    return
  prunable = traced.prunable_paths
  if arch == "gpt" and p.after_training and p.needs_data:  # calibration pruners: the
    # token table is a lookup, not a product with an input (the papers prune the blocks)
    prunable = [q for q in prunable if q.startswith("block_")]
    kw["prunable"] = prunable
    traced = traced.narrow(prunable)
  if name in GLOBAL_ON_INIT_WEIGHTS:
    try:
      m = sparsejax.prune(name, **kw)
    except errors.UnreachableSparsityError as err:  # no connected member keeps <= 10%
      assert pruning_type == "effective" and err.max_sparsity < 0.9, err
      return
    direct = masks_lib.compression(m)
    eff = effective.effective_compression(traced, m)
    assert eff >= direct * (1 - 1e-9)
    if pruning_type == "direct":
      assert direct >= 10 * (1 - 2e-3)  # 10% kept, rounded
    else:
      assert eff >= 10 * (1 - 1e-9)  # reached (or UnreachableSparsityError above)
    return
  m = sparsejax.prune(name, **kw)
  assert set(masks_lib.paths(m)) == set(prunable)
  direct = masks_lib.compression(m)
  eff = effective.effective_compression(traced, m)
  if pruning_type == "direct":
    leaves = masks_lib.mask_leaves(m)
    total = sum(x.size for x in leaves)
    kept = sum(int(np.sum(x)) for x in leaves)
    if p.quota is None and p.quota_from is None:  # one global ranking: round(0.1 N) kept
      assert kept == round(0.1 * total)
    else:  # a quota keeps round(n_l d_l) per layer, sum n_l d_l = 0.1 N (ranking.py)
      assert abs(kept - 0.1 * total) <= len(leaves) / 2
    assert 10 * (1 - 1e-3) <= eff < np.inf
  else:
    # the search's contract (sparsejax.search): the largest member of the ranking whose
    # active weights E(k) are at most T = floor(0.1 N); the next member exceeds T
    def active(masks):
      return sum(
        int(np.sum(x)) for x in masks_lib.mask_leaves(effective.effective_masks(traced, masks))
      )

    leaves = masks_lib.mask_leaves(m)
    total, kept = sum(x.size for x in leaves), sum(int(np.sum(x)) for x in leaves)
    target = int(np.floor(0.1 * total + 1e-6))
    assert active(m) <= target and direct <= eff * (1 + 1e-9)
    ranking = sparsejax.ranking_for(name, **{k: w for k, w in kw.items() if k != "pruning_type"})
    # member k keeps k weights of a global ranking, round(n_l d_l(k / N)) per layer of a
    # quota ranking: the last k whose layer counts are those of m
    counts = [int(np.sum(x)) for x in leaves]
    k = max(
      k
      for k in range(kept - len(leaves), kept + len(leaves) + 1)
      if list(ranking.host_counts(k)) == counts
    )
    member = pruning.masks_from_ranking(ranking, 1 - k / total, "direct")
    assert all(np.array_equal(a, b) for a, b in zip(masks_lib.mask_leaves(member), leaves))
    assert active(pruning.masks_from_ranking(ranking, 1 - (k + 1) / total, "direct")) > target


def test_dead_parts_counts_heads_neurons_and_dimensions_by_hand():
  """dead_parts on hand-made masks of a 2-block GPT (width 16, 2 heads of 8, MLP 32):
  a head dies with all its value columns or all its output rows, an MLP neuron with its
  'fc' column or its 'proj' row, an embedding dimension with its table column; a dead
  query alone kills no head."""
  model = tiny_gpt()
  net = sparsejax.trace(model, TOKENS, variables=models.init(model, jax.random.key(0), TOKENS))
  m = jax.tree.map(np.array, net.ones())
  p = m["params"] if "params" in m else m
  assert models.transformer.dead_parts(m, 2) == {
    "heads": (0, 4),
    "mlp_neurons": (0, 64),
    "embedding_dims": (0, 16),
  }
  p["block_0"]["attention"]["value"]["kernel"][:, 8:] = False  # head 1 of block 0
  p["block_1"]["attention"]["out"]["kernel"][:8, :] = False  # head 0 of block 1
  p["block_1"]["attention"]["query"]["kernel"][:, :8] = False  # not a dead head
  p["block_0"]["attention"]["value"]["kernel"][0, :8] = False  # one weight: alive
  p["block_0"]["mlp"]["fc"]["kernel"][:, [3, 5]] = False
  p["block_1"]["mlp"]["proj"]["kernel"][7, :] = False
  p["embed"]["embedding"][:, [2, 9, 11]] = False
  assert models.transformer.dead_parts(m, 2) == {
    "heads": (2, 4),
    "mlp_neurons": (3, 64),
    "embedding_dims": (3, 16),
  }


def test_a_dead_value_projection_is_a_dead_head_in_direct_and_effective_masks():
  """With one head's value columns pruned, dead_parts counts one dead head in the direct
  and in the effective masks. The head's output rows stay effective: its values are the
  value bias b_v, and ``probs @ b_v`` is a path from the input in the graph (the
  transform does not know that softmax rows sum to 1, which makes it a constant); with
  biases left out (tests/test_sequence_connectivity.py) they die too."""
  model = tiny_gpt(depth=1)
  net = sparsejax.trace(model, TOKENS, variables=models.init(model, jax.random.key(0), TOKENS))
  m = jax.tree.map(np.array, net.ones())
  p = m["params"] if "params" in m else m
  p["block_0"]["attention"]["value"]["kernel"][:, :8] = False
  eff = effective.effective_masks(net, m)
  e = eff["params"] if "params" in eff else eff
  assert not np.asarray(e["block_0"]["attention"]["value"]["kernel"])[:, :8].any()
  assert np.asarray(e["block_0"]["attention"]["out"]["kernel"])[:8].all()  # via b_v
  assert models.transformer.dead_parts(m, 2)["heads"] == (1, 2)
  assert models.transformer.dead_parts(eff, 2)["heads"] == (1, 2)
