"""Every primitive that common models emit has a rule (issue 25, item 3).

The corpus (tests/corpus/, one module per source, each naming its repository, file, commit
and license) holds models of public codebases at tiny sizes: the Flax examples lm1b, wmt
and sst2, big_vision's ViT and MLP-Mixer, and the Flax model hub's BERT, GPT-2, ViT and T5.
For each, as a user would call it (token ids as integer inputs):

- the primitives of its traced program, inner jaxprs included, that act on values
  depending on the input or the parameters are all in
  ``sparsejax.connectivity.supported_primitives()`` (others must be folded as constants);
  an independent data-flow walk, so a failure names every such primitive, the model and
  the line at once;
- ``sparsejax.trace`` accepts it (its constructs, not only its primitives, have rules);
- (slow) effective masks of random masks, SynFlow scores, and the ``magnitude/global`` and
  ``random/igq`` pruners at 90% effective sparsity run and keep their contracts.

Cases that fail today are marked ``xfail(strict=True)`` with the reason, so that they flip
when the rule lands.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax
from sparsejax import _jax_compat, connectivity, effective, errors, masks, pruning, scores
from tests.corpus import (
  big_vision_mlp_mixer,
  big_vision_vit,
  flax_lm1b,
  flax_sst2,
  flax_wmt,
  hf_bert,
  hf_gpt2,
  hf_t5,
  hf_vit,
)

VOCAB, LENGTH = 16, 4
KEY = jax.random.key(0)


def _ids(*shape) -> jax.Array:
  """Token ids 1..VOCAB-1 (no padding id 0) of ``shape`` (int32)."""
  return (jnp.arange(int(np.prod(shape))).reshape(shape) % (VOCAB - 1) + 1).astype(jnp.int32)


IMAGE = jnp.linspace(0.0, 1.0, 8 * 8 * 3, dtype=jnp.float32).reshape(1, 8, 8, 3)


@dataclasses.dataclass(eq=False)
class Case:
  """A corpus model as a user calls it: ``model`` (a Flax module or ``apply(params, x)``),
  ``init()`` its variables, an example input and the call's keyword arguments."""

  model: object
  init: Callable[[], object]
  example: jax.Array
  apply_kwargs: dict | None = None
  #: why every SynFlow score is 0 (R = 0 for every weight), where that is the right answer
  synflow_zero: str | None = None

  @functools.cached_property
  def shapes(self):
    """The variables' shape structs (what tracing needs; no initializer runs)."""
    return jax.eval_shape(self.init)

  @functools.cached_property
  def variables(self):
    """The variables (one compiled initializer: eager Flax init dispatches every op)."""
    return jax.jit(self.init)()

  @staticmethod
  def params_of(variables):
    v = variables
    return v["params"] if hasattr(v, "keys") and "params" in v else v

  def function(self) -> Callable:
    """``apply(params, x)`` of the model (what the primitive walk traces)."""
    if not hasattr(self.model, "apply"):
      return self.model
    kw = self.apply_kwargs or {}
    return lambda p, x: self.model.apply({"params": p}, x, **kw)

  def trace(self) -> sparsejax.Traced:
    return sparsejax.trace(
      self.model, self.example, variables=self.shapes, apply_kwargs=self.apply_kwargs
    )


def _lm1b() -> Case:
  cfg = flax_lm1b.TransformerConfig(
    vocab_size=VOCAB,
    output_vocab_size=VOCAB,
    emb_dim=8,
    num_heads=2,
    num_layers=1,
    qkv_dim=8,
    mlp_dim=16,
    max_len=LENGTH,
    deterministic=True,
  )
  model = flax_lm1b.TransformerLM(cfg)
  ids = _ids(1, LENGTH)
  return Case(model, lambda: model.init(KEY, ids), ids)  # boxed (partitioned) params


def _wmt() -> Case:
  cfg = flax_wmt.TransformerConfig(  # the example's default: one embedding for all three
    vocab_size=VOCAB,
    output_vocab_size=VOCAB,
    share_embeddings=True,
    logits_via_embedding=True,
    emb_dim=8,
    num_heads=2,
    num_layers=1,
    qkv_dim=8,
    mlp_dim=16,
    max_len=LENGTH,
    deterministic=True,
  )
  model = flax_wmt.Transformer(cfg)
  pair = _ids(1, 2, LENGTH)  # [B, (source, target), L]
  init = lambda: model.init(KEY, pair[:, 0], pair[:, 1])["params"]
  return Case(lambda p, x: model.apply({"params": p}, x[:, 0], x[:, 1]), init, pair)


def _sst2_model() -> flax_sst2.TextClassifier:
  return flax_sst2.TextClassifier(
    embedding_size=8,
    hidden_size=8,
    vocab_size=VOCAB,
    output_size=2,
    dropout_rate=0.0,
    word_dropout_rate=0.0,
  )


def _sst2() -> Case:
  """Lengths as a keyword argument of the call: known when tracing."""
  model, ids = _sst2_model(), _ids(1, LENGTH)
  kw = {"lengths": jnp.full((1,), LENGTH, jnp.int32), "deterministic": True}
  return Case(model, lambda: model.init(KEY, ids, **kw), ids, kw)


def _sst2_lengths_in_input() -> Case:
  """Lengths as part of the input (the last column): the backward LSTM's
  ``flip_sequences`` then gathers activations at input-dependent positions."""
  model = _sst2_model()
  x = jnp.concatenate([_ids(1, LENGTH), jnp.full((1, 1), LENGTH, jnp.int32)], axis=1)
  init = lambda: model.init(KEY, x[:, :-1], x[:, -1], deterministic=True)["params"]
  fn = lambda p, x: model.apply({"params": p}, x[:, :-1], x[:, -1], deterministic=True)
  return Case(fn, init, x)


def _big_vision(module, **kw) -> Case:
  """big_vision's models return (logits, intermediates): the train loop's logits."""
  init = lambda: module.init(KEY, IMAGE)["params"]
  return Case(lambda p, x: module.apply({"params": p}, x)[0], init, IMAGE, **kw)


def _bv_vit_map_scan() -> Case:  # MAP head (tile of a probe), nn.scan over nn.remat blocks
  return _big_vision(
    big_vision_vit.Model(
      num_classes=4,
      patch_size=(4, 4),
      width=8,
      depth=2,
      mlp_dim=16,
      num_heads=2,
      pool_type="map",
      scan=True,
      head_zeroinit=False,  # a zero head makes every SynFlow score 0 (the Mixer shows it)
    )
  )


def _bv_vit_tok() -> Case:  # class token (tile, concatenate), fixed sin-cos positions
  return _big_vision(
    big_vision_vit.Model(
      num_classes=4,
      patch_size=(4, 4),
      width=8,
      depth=1,
      mlp_dim=16,
      num_heads=2,
      pool_type="tok",
      posemb="sincos2d",
      head_zeroinit=False,
    )
  )


def _bv_mixer() -> Case:
  return _big_vision(
    big_vision_mlp_mixer.Model(
      num_classes=4,
      patch_size=(4, 4),
      num_blocks=1,
      hidden_dim=8,
      tokens_mlp_dim=8,
      channels_mlp_dim=16,
    ),
    synflow_zero="its head is zero-initialized and every input-to-output path crosses it",
  )


def _hf_params(module, forward, *inputs):
  """The params of a model hub module, initialized through the call its PreTrainedModel
  wrapper makes (``forward``: the inputs it fills in, their dtypes)."""
  box = {}

  class Init:  # stands in for the module: its ``apply`` runs ``init`` on the same arguments
    config = module.config

    @staticmethod
    def apply(variables, *args, **kw):
      del variables
      box["v"] = module.init(KEY, *args, **kw)
      return (None,)

  forward(Init, None, *inputs)
  return box["v"]["params"]


def _hf_bert() -> Case:
  cfg = hf_bert.BertConfig(
    vocab_size=VOCAB,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=LENGTH,
  )
  module, ids = hf_bert.FlaxBertForMaskedLMModule(cfg), _ids(1, LENGTH)
  init = lambda: _hf_params(module, hf_bert.forward, ids)
  return Case(lambda p, x: hf_bert.forward(module, p, x)[0], init, ids)


def _hf_gpt2() -> Case:
  cfg = hf_gpt2.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2)
  module, ids = hf_gpt2.FlaxGPT2LMHeadModule(cfg), _ids(1, LENGTH)
  init = lambda: _hf_params(module, hf_gpt2.forward, ids)
  return Case(lambda p, x: hf_gpt2.forward(module, p, x)[0], init, ids)


def _hf_vit() -> Case:
  cfg = hf_vit.ViTConfig(
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    image_size=8,
    patch_size=4,
    num_channels=3,
    num_labels=4,
  )
  module = hf_vit.FlaxViTForImageClassificationModule(cfg)
  nchw = jnp.transpose(IMAGE, (0, 3, 1, 2))  # the wrapper's layout
  init = lambda: _hf_params(module, hf_vit.forward, nchw)
  return Case(lambda p, x: hf_vit.forward(module, p, x)[0], init, nchw)


def _hf_t5() -> Case:
  cfg = hf_t5.T5Config(  # T5 v1.1 / Flan-T5 style: gated GELU, untied head
    vocab_size=VOCAB,
    d_model=8,
    d_kv=4,
    d_ff=16,
    num_layers=1,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
  )
  module = hf_t5.FlaxT5ForConditionalGenerationModule(cfg)
  pair = _ids(1, 2, LENGTH)  # [B, (input ids, decoder input ids), L]
  init = lambda: _hf_params(module, hf_t5.forward, pair[:, 0], pair[:, 1])
  return Case(lambda p, x: hf_t5.forward(module, p, x[:, 0], x[:, 1])[0], init, pair)


CASES: dict[str, Callable[[], Case]] = {
  "flax_lm1b": _lm1b,
  "flax_wmt": _wmt,
  "flax_sst2": _sst2,
  "flax_sst2_lengths_in_input": _sst2_lengths_in_input,
  "big_vision_vit_map_scan": _bv_vit_map_scan,
  "big_vision_vit_tok": _bv_vit_tok,
  "big_vision_mlp_mixer": _bv_mixer,
  "hf_bert": _hf_bert,
  "hf_gpt2": _hf_gpt2,
  "hf_vit": _hf_vit,
  "hf_t5": _hf_t5,
}

#: (case, step) -> why it fails today: xfail(strict=True), so each flips when fixed.
#: Empty: the last entries (sst2's roll by each sequence's length, the padding mask under
#: SynFlow, the LSTM's overflow and the class token's zero flow) were fixed by the dynamic
#: reads, predicates and per-factor rescaling of connectivity.semantics.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


@functools.cache
def _case(name: str) -> Case:
  return CASES[name]()


@functools.cache
def _traced(name: str) -> sparsejax.Traced:
  return _case(name).trace()


# ---------------------------------------------------------------------- the primitive walk


def _inner(eqn) -> list:
  """The jaxprs inside ``eqn``'s params (calls, loops, branches, custom rules)."""
  out = []
  for v in eqn.params.values():
    for u in v if isinstance(v, (list, tuple)) else [v]:
      if isinstance(u, _jax_compat.ClosedJaxpr):
        out.append(u.jaxpr)
      elif isinstance(u, _jax_compat.Jaxpr):
        out.append(u)
  return out


def _live_eqns(jaxpr, live_in: list[bool], found: list, where: str = "") -> list[bool]:
  """Walks ``jaxpr`` with the invars' liveness ``live_in`` (depends on the input or the
  parameters), appending every equation with a live operand to ``found`` as (primitive
  name, source line: the enclosing call's, ``where``, inside a library's jit); returns
  the outvars' liveness. Inner jaxprs see their operands' liveness (loop carries iterated
  to a fixed point; any other higher-order primitive: every inner input live if an
  operand is)."""
  live = {v: b for v, b in zip(jaxpr.invars, live_in)}
  is_live = lambda a: not isinstance(a, _jax_compat.Literal) and live.get(a, False)
  for eqn in jaxpr.eqns:
    ins = [is_live(a) for a in eqn.invars]
    src = _jax_compat.source_line(eqn) or where
    if any(ins):
      found.append((eqn.primitive.name, src))
    if _inner(eqn):
      outs = _inner_liveness(eqn, ins, found, src)
    else:
      outs = [any(ins)] * len(eqn.outvars)
    live.update(zip(eqn.outvars, outs))
  return [is_live(a) for a in jaxpr.outvars]


def _inner_liveness(eqn, ins: list[bool], found: list, where: str) -> list[bool]:
  name, p = eqn.primitive.name, eqn.params
  if name == "scan":
    nc, nk = p["num_consts"], p["num_carry"]
    carry = ins[nc : nc + nk]
    while True:  # a carry is live once any iteration makes it so
      outs = _live_eqns(p["jaxpr"].jaxpr, ins[:nc] + carry + ins[nc + nk :], [])
      new = [a or b for a, b in zip(carry, outs[:nk])]
      if new == carry:
        break
      carry = new
    outs = _live_eqns(p["jaxpr"].jaxpr, ins[:nc] + carry + ins[nc + nk :], found, where)
    return carry + outs[nk:]
  if name == "while":
    cc, bc = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cc + bc :]
    while True:
      outs = _live_eqns(p["body_jaxpr"].jaxpr, ins[cc : cc + bc] + carry, [])
      new = [a or b for a, b in zip(carry, outs)]
      if new == carry:
        break
      carry = new
    _live_eqns(p["cond_jaxpr"].jaxpr, ins[:cc] + carry, found, where)
    _live_eqns(p["body_jaxpr"].jaxpr, ins[cc : cc + bc] + carry, found, where)
    return carry
  if name == "cond":
    outs = [False] * len(eqn.outvars)
    for branch in p["branches"]:
      b = _live_eqns(branch.jaxpr, ins[1:], found, where)
      outs = [x or y or ins[0] for x, y in zip(outs, b)]
    return outs
  inner = _inner(eqn)
  if name in connectivity.CALLS and len(inner[0].invars) == len(ins):
    outs = _live_eqns(inner[0], ins, found, where)
    return outs if len(outs) == len(eqn.outvars) else [any(ins)] * len(eqn.outvars)
  for j in inner:  # custom rules and anything else: conservatively all live
    _live_eqns(j, [any(ins)] * len(j.invars), found, where)
  return [any(ins)] * len(eqn.outvars)


def live_primitives(case: Case) -> dict[str, list[str]]:
  """{primitive: source lines} of the equations of ``case``'s traced program (inner
  jaxprs included) that act on values depending on its input or parameters."""
  params = case.params_of(case.shapes)
  closed = jax.make_jaxpr(case.function())(params, case.example)
  n_params = len(jax.tree.leaves(params))
  found = []
  _live_eqns(closed.jaxpr, [True] * (n_params + len(jax.tree.leaves(case.example))), found)
  by_name = {}
  for name, src in found:
    by_name.setdefault(name, []).append(src)
  return by_name


# ---------------------------------------------------------------------- tests


#: The models whose SynFlow and pruner cases run by default (a padding mask under
#: attention, and a learned class token); the others' are an acceptance grid run with
#: ``pytest -m exhaustive`` (their trace and effective masks run by default).
DEFAULT_RUN = ("flax_lm1b", "hf_vit")


def _marks(name: str, step: str) -> list:
  """xfail(strict) where (name, step) is a known failure; slow for all but the trace;
  exhaustive for SynFlow and the pruners outside :data:`DEFAULT_RUN`."""
  why = KNOWN_FAILURES.get((name, step))
  marks = [pytest.mark.xfail(strict=True, reason=why)] if why else []
  if step == "trace":
    return marks
  if step != "effective" and name not in DEFAULT_RUN:
    return [*marks, pytest.mark.exhaustive]
  return [*marks, pytest.mark.slow]


def _param(name: str, step: str, *values):
  return pytest.param(name, *values, id="-".join([name, *values]), marks=_marks(name, step))


@pytest.mark.parametrize("name", [_param(n, "trace") for n in CASES])
def test_every_primitive_of_the_corpus_has_a_rule(name):
  case = _case(name)
  supported = set(connectivity.supported_primitives())
  live = live_primitives(case)
  missing = {p: sorted(set(lines))[:3] for p, lines in live.items() if p not in supported}
  assert not missing, (
    f"model {name}: primitives without a connectivity rule act on values that depend on "
    f"the input or the parameters: {missing}"
  )
  try:
    traced = _traced(name)
  except ValueError as err:
    pytest.fail(f"model {name}: sparsejax.trace refuses it: {err}")
  used = {e.prim.name for e in traced.program.eqns}
  assert used <= supported, f"model {name}: the program keeps {sorted(used - supported)}"
  assert traced.prunable_paths, f"model {name}: no prunable weight"


@pytest.mark.parametrize("name", [_param(n, "effective") for n in CASES])
def test_effective_masks_of_random_masks(name):
  traced = _traced(name)
  m = masks.random(KEY, traced.ones(), 0.9)
  eff = effective.effective_masks(traced, m)
  for a, b in zip(masks.mask_leaves(eff), masks.mask_leaves(m)):
    assert not np.any(np.asarray(a) & ~np.asarray(b)), f"{name}: an effective weight was pruned"
  kept_eff, total = masks.count(eff)
  assert 0 < kept_eff <= masks.count(m)[0] and total == masks.count(m)[1]


@pytest.mark.parametrize("name", [_param(n, "synflow") for n in CASES])
def test_synflow_scores(name):
  case, traced = _case(name), _traced(name)
  s = scores.synflow_scores(traced, case.variables)
  leaves = [np.asarray(s_) for s_ in jax.tree.leaves(s)]
  assert leaves and all(np.all(np.isfinite(v)) and np.all(v >= 0) for v in leaves)
  if case.synflow_zero:  # R = 0 for every weight: so is each score |w dR/dw|
    assert not any(np.any(v > 0) for v in leaves), f"{name}: {case.synflow_zero}"
  else:
    assert any(np.any(v > 0) for v in leaves), f"{name}: every SynFlow score is 0"


@pytest.mark.parametrize(
  "name,pruner",
  [_param(n, p, p) for n in CASES for p in ("magnitude/global", "random/igq")],
)
def test_pruners_at_90_percent_effective_sparsity(name, pruner):
  case, traced = _case(name), _traced(name)
  try:
    m = pruning.prune(
      pruner,
      key=KEY,
      model=traced,
      variables=case.variables,
      trained_params=case.params_of(case.variables),  # magnitude: the weights at init
      sparsity=0.9,
      pruning_type="effective",
    )
  except errors.UnreachableSparsityError as err:
    # Global magnitude at init prunes the layers of smallest scale first (an embedding
    # of std 0.1 beside Dense layers of std 0.35, a zero-initialized head) and
    # disconnects the network before 90% (layer collapse): the documented answer. Layer-
    # wise random quotas (igq) never empty a layer, so they must reach it.
    assert pruner == "magnitude/global" and err.max_sparsity < 0.9, err
    return
  assert effective.effective_sparsity(traced, m) >= 0.9 - 1e-6
  assert masks.count(m)[1] == sum(int(np.prod(s.shape)) for s in masks.mask_leaves(traced.ones()))


def test_the_walk_names_each_primitive_without_a_rule_and_folds_constants():
  """The audit itself: a primitive without a rule on the input (inside a library's jit,
  inside a loop) is named with the user's line; on constants only it is folded."""

  def model(p, x):
    h = jax.lax.fori_loop(0, 2, lambda i, h: jnp.fft.fft(h).real, x @ p)
    return h + jnp.fft.fft(jnp.arange(3.0)).real  # constants only: folded when built

  case = Case(model, lambda: jnp.ones((3, 3)), jnp.ones((1, 3)))
  live = live_primitives(case)
  assert "fft" not in connectivity.supported_primitives()
  assert len(live["fft"]) == 1 and "test_primitive_corpus.py" in live["fft"][0]
  assert {"dot_general", "add"} <= set(live) and "iota" not in live
  with pytest.raises(ValueError, match="fft"):
    sparsejax.trace(model, jnp.ones((1, 3)), variables=jnp.ones((3, 3)))
