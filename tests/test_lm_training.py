"""Training the transformers: the ViT as an image classifier, the GPT as a byte-level
language model (next-token loss, held-out bits per byte and perplexity), the AdamW and
cosine choices of TrainConfig, and prune_train on both (tiny runs, synthetic data)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from experiments import configs, datasource, prune_train, run_config
from sparsejax import data, models, training
from sparsejax import masks as masks_lib
from sparsejax.errors import FieldError
from sparsejax.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(**kw):
  return models.GPT(**{"context": 16, "width": 16, "depth": 1, "heads": 2, "mlp_ratio": 2, **kw})


def adamw(dataset, steps, batch, lr=3e-3, **kw):
  return training.TrainConfig(
    **{
      "dataset": dataset,
      "batch_size": batch,
      "train_steps": steps,
      "learning_rate": lr,
      "momentum": 0.9,
      "weight_decay": 0.01,
      "decay_boundaries": (),
      "optimizer": "adamw",
      "schedule": "cosine",
      "warmup_fraction": 0.1,
      "beta2": 0.95,
      "grad_clip": 1.0,
      **kw,
    }
  )


# ------------------------------------------------------------------ the recipe


def test_the_paper_recipe_stays_the_default_and_the_transformers_choose_adamw():
  for arch in ("lenet300100", "lenet5", "vgg16", "vgg19", "resnet18"):
    c = configs.get_config(arch)
    assert (c.optimizer, c.schedule, c.warmup_fraction, c.grad_clip) == ("sgd", "piecewise", 0, 0)
  vit, gpt = configs.get_config("vit"), configs.get_config("gpt")
  assert (vit.dataset, vit.optimizer, vit.schedule) == ("mnist", "adamw", "cosine")
  assert (gpt.dataset, gpt.optimizer, gpt.schedule, gpt.beta2) == ("text", "adamw", "cosine", 0.95)
  assert gpt.train_steps > 10_000 and vit.train_steps > 10_000
  c = configs.load("gpt", ["optimizer=sgd", "schedule=piecewise", "warmup_fraction=0"])
  assert configs.train_config(c).optimizer == "sgd"


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("optimizer", "adam", "optimizer='adam' must be one of sgd, adamw"),
    ("schedule", "linear", "schedule='linear' must be one of piecewise, cosine"),
    ("warmup_fraction", 1.0, r"warmup_fraction=1.0 must be a number in \[0, 1\)"),
    ("beta2", 1.0, r"beta2=1.0 must be a number in \[0, 1\)"),
    ("beta2", float("nan"), r"beta2=nan must be a number in \[0, 1\)"),
    ("grad_clip", -1.0, "grad_clip=-1.0 must be a finite number >= 0"),
    ("grad_clip", float("inf"), "grad_clip=inf must be a finite number >= 0"),
  ],
)
def test_optimizer_fields_are_checked(field, value, match):
  with pytest.raises(FieldError, match=match) as err:
    dataclasses.replace(adamw("text", 10, 2), **{field: value})
  assert err.value.field == field
  with pytest.raises(FieldError, match="warmup_fraction=0.1 must be 0 for schedule='piecewise'"):
    dataclasses.replace(adamw("text", 10, 2), schedule="piecewise")


def test_the_cosine_schedule_warms_up_and_decays_to_zero():
  sched = training.make_schedule(adamw("text", 100, 2, lr=1.0))
  np.testing.assert_allclose(
    [float(sched(t)) for t in (0, 5, 10, 55, 100)], [0, 0.5, 1, 0.5, 0], atol=1e-6
  )


def test_adamw_decays_only_the_prunable_weights_decoupled_from_the_gradient():
  cfg = adamw("text", 10, 2, lr=0.1, warmup_fraction=0.0, weight_decay=0.5, grad_clip=0.0)
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  tx = training.make_optimizer(cfg, ["w"])
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # zero gradient: Adam's step is 0, the decay is -lr * wd * w on w only
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates["b"], 0.0)
  clipped = training.make_optimizer(dataclasses.replace(cfg, grad_clip=1.0), ["w"])
  assert len(clipped.init(params)) == 2  # clip, then adamw


def test_checkpoint_metadata_of_the_paper_recipe_is_what_it_was():
  cfg = configs.get_config("lenet300100")
  meta = checkpoints.run_meta(cfg, 0, jax.random.key(0), True)
  assert set(meta["config"]) == {
    "dataset",
    "batch_size",
    "train_steps",
    "learning_rate",
    "momentum",
    "weight_decay",
    "decay_boundaries",
    "decay_factor",
    "snip_batch_size",
  }
  meta = checkpoints.run_meta(configs.get_config("gpt"), 0, jax.random.key(0), True)
  assert meta["config"]["optimizer"] == "adamw" and meta["config"]["beta2"] == 0.95


# ------------------------------------------------------------------ training


@pytest.mark.slow
def test_the_vit_trains_as_an_image_classifier():
  model = models.ViT(width=16, depth=1, heads=2, mlp_ratio=2)
  train_data = data.synthetic_split("mnist", "train", 256)
  test_data = data.synthetic_split("mnist", "test", 64)
  cfg = adamw("mnist", 40, 32, lr=3e-3)
  result = training.train(model, "mnist", cfg, train_data, test_data, eval_every=40, log_every=10)
  first = training.train(
    model, "mnist", cfg, train_data, test_data, num_steps=0, eval_every=40, log_every=10
  )
  # transformers start slowly: 2.50 -> 2.30 nats after 30 steps, 2.19 after 60
  assert result.final_test_loss < first.final_test_loss - 0.15
  assert result.final_metrics == {
    "test_loss": result.final_test_loss,
    "test_accuracy": result.final_test_accuracy,
  }


def manual_text_loss(model, params, corpus, context):
  """Mean next-byte cross-entropy over every byte after the first, window by window."""
  total, count = 0.0, 0
  for start in range(0, len(corpus) - 1, context):
    window = jnp.asarray(corpus[start : start + context + 1], jnp.int32)[None]
    logits = model.apply({"params": params}, window[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, window[:, 1:])
    total += float(ce.sum())
    count += ce.size
  return total / count


@pytest.mark.slow
def test_the_gpt_trains_on_text_and_reports_bits_per_byte_and_perplexity():
  model = tiny_gpt()
  train_text = data.synthetic_text("text", "train", 16384)
  test_text = data.synthetic_text("text", "test", 1000)
  cfg = adamw("text", 60, 16)
  result = training.train(
    model, "text", cfg, train_text, test_text, input_shape=(16,), eval_every=30, log_every=10
  )
  loss = result.final_test_loss
  assert loss < math.log(256) - 1.0  # from about ln 256 = 5.5 (initial logits near 0)
  assert [h["step"] for h in result.history] == [30, 60]
  last = result.history[-1]
  assert last["test_bits_per_byte"] == pytest.approx(loss / math.log(2), rel=1e-12)
  assert last["test_perplexity"] == pytest.approx(math.exp(loss), rel=1e-12)
  assert result.final_metrics == {k: v for k, v in last.items() if k != "step"}
  assert training.language_model_metrics(math.log(256)) == pytest.approx(
    {"bits_per_byte": 8.0, "perplexity": 256.0}
  )
  # the held-out loss is the mean over every byte of the split, each predicted once
  manual = manual_text_loss(model, result.state.params, test_text, 16)
  assert loss == pytest.approx(manual, rel=1e-4)
  # batches a pure function of (seed, step): the same run again ends the same
  again = training.train(
    model, "text", cfg, train_text, test_text, input_shape=(16,), eval_every=30, log_every=10
  )
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(again.state.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_masked_language_model_keeps_its_pruned_weights_at_zero(tmp_path):
  model = tiny_gpt(tied=True)
  example = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  variables = models.init(model, jax.random.key(0), example)
  traced = sparsejax.trace(model, example, variables=variables)
  masks = masks_lib.random(jax.random.key(1), traced.ones(), 0.8)
  train_text = data.synthetic_text("text", "train", 4096)
  test_text = data.synthetic_text("text", "test", 500)
  cfg = adamw("text", 20, 8)
  kw = dict(input_shape=(16,), masks=masks, params=variables["params"], eval_every=10)
  result = training.train(model, "text", cfg, train_text, test_text, workdir=str(tmp_path), **kw)
  for w, m in zip(
    masks_lib.mask_leaves(masks_lib.map_masks(lambda m, w: w, masks, result.state.params)),
    masks_lib.mask_leaves(masks),
  ):
    assert not np.asarray(w)[~np.asarray(m)].any()
  # resumed from its checkpoint: nothing left to train, the same final numbers
  resumed = training.train(model, "text", cfg, train_text, test_text, workdir=str(tmp_path), **kw)
  assert resumed.start_step == 20 and resumed.final_metrics == result.final_metrics


@pytest.mark.slow
def test_text_training_names_its_bad_arguments():
  model, cfg = tiny_gpt(), adamw("text", 4, 2)
  text = data.synthetic_text("text", "train", 4096)
  with pytest.raises(ValueError, match=r"needs its context, input_shape=\(T,\)"):
    training.train(model, "text", cfg, text, text)
  with pytest.raises(ValueError, match="must be its bytes, a uint8 numpy array"):
    training.train(model, "text", cfg, text.astype(np.int32), text, input_shape=(16,))
  with pytest.raises(ValueError, match="needs at least 33 bytes"):
    training.train(model, "text", cfg, text[:20], text, input_shape=(16,))
  # a ModelSpec brings its context
  spec = models.ModelSpec(tiny_gpt, {}, "text", (16,), 256, input_dtype="int32")
  result = training.train(model, spec, cfg, text, text[:200], num_steps=1, eval_every=1)
  assert result.history[-1]["step"] == 1 and "test_bits_per_byte" in result.history[-1]


# ------------------------------------------------------------------ prune_train

TINY = ["train_steps=4", "eval_every=2", "checkpoint_every=2", "log_every=2", "score_batches=2"]


@pytest.fixture(scope="module")
def tiny_archs():
  """Small registered versions of the zoo's transformers ('gpt_tiny', 'vit_tiny'), run with
  the gpt and vit configs (--config.arch=...): the same code path, a fraction of the time."""
  specs = {
    "gpt_tiny": models.ModelSpec(
      models.gpt.build,
      dict(context=16, width=16, depth=1, heads=2, mlp_ratio=2),
      "text",
      (16,),
      256,
      input_dtype="int32",
    ),
    "vit_tiny": models.ModelSpec(
      models.ViT, dict(width=16, depth=1, heads=2, mlp_ratio=2), "mnist", (28, 28, 1), 10
    ),
  }
  for name, spec in specs.items():
    models.register_model(name, spec)
  yield
  for name in specs:
    models.MODELS.pop(name, None)


@pytest.mark.slow
def test_prune_train_trains_the_language_model_and_writes_bits_per_byte(tmp_path, tiny_archs):
  c = configs.load("gpt", TINY + ["arch=gpt_tiny", "pruner=snip", "compression=10", "batch_size=4"])
  source = datasource.DataSource(synthetic=True, num_examples=5000)
  r = prune_train.run(c, out_dir=str(tmp_path), source=source)
  name = run_config.run_name(c)
  assert name == "gpt_tiny-text_snip_direct_c10_s0_t4"
  on_disk = json.load(open(tmp_path / name / "result.json"))
  assert on_disk["status"] == "ok" and on_disk["config"]["dataset"] == "text"
  loss = on_disk["test_loss"]
  assert on_disk["test_bits_per_byte"] == pytest.approx(loss / math.log(2))
  assert on_disk["test_perplexity"] == pytest.approx(math.exp(loss))
  assert on_disk["history"][-1]["test_bits_per_byte"] == pytest.approx(loss / math.log(2))
  assert on_disk["direct_compression"] == pytest.approx(10, rel=1e-3)
  assert on_disk["config"]["train"]["optimizer"] == "adamw"
  assert "embed/embedding" in [layer["layer"] for layer in on_disk["layers"]]
  assert r["test_bits_per_byte"] == on_disk["test_bits_per_byte"]


@pytest.mark.slow
def test_prune_train_reads_a_text_folder(tmp_path, tiny_archs):
  folder = tmp_path / "corpus"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for split, size in (("train", 2000), ("valid", 500), ("test", 500)):
    (folder / f"{split}.txt").write_bytes(rng.integers(97, 101, size).astype(np.uint8).tobytes())
  source = datasource.DataSource(text_dir=str(folder))
  c = configs.load("gpt", TINY + ["arch=gpt_tiny", "pruner=random/igq", "compression=10"])
  r = prune_train.run(c, out_dir=str(tmp_path / "out"), source=source)
  assert r["status"] == "ok" and not r["config"]["synthetic_data"]
  assert r["test_bits_per_byte"] == pytest.approx(r["test_loss"] / math.log(2))
  missing = datasource.DataSource(text_dir=str(tmp_path))
  with pytest.raises(ValueError, match="lacks train.txt.gz, valid.txt.gz, test.txt.gz"):
    prune_train.run(c, out_dir=str(tmp_path / "out"), source=missing)


# The ViT through prune_train (an image classifier like the others, whose path
# tests/test_prune_train.py covers by default): on request, pytest -m exhaustive.
@pytest.mark.exhaustive
def test_prune_train_trains_the_vit(tmp_path, tiny_archs):
  c = configs.load("vit", TINY + ["arch=vit_tiny", "pruner=random/igq", "compression=10"])
  r = prune_train.run(
    c, out_dir=str(tmp_path / "out"), source=datasource.DataSource(True, None, None, 256)
  )
  assert r["status"] == "ok" and "test_bits_per_byte" not in r
  assert r["effective_compression"] >= 10 * (1 - 1e-3)


@pytest.mark.slow
def test_prune_train_refuses_a_language_model_on_images_and_a_missing_folder(tmp_path):
  with pytest.raises(ValueError, match="'gpt' takes token ids, but --config.dataset='mnist'"):
    prune_train.check_config(
      configs.load("gpt", ["dataset=mnist"]), str(tmp_path), datasource.DataSource(True)
    )
  with pytest.raises(ValueError, match="'vit' takes images, but --config.dataset='text'"):
    prune_train.check_config(
      configs.load("vit", ["dataset=text"]), str(tmp_path), datasource.DataSource(True)
    )
  env = {k: v for k, v in os.environ.items() if k != data.TEXT_DIR_ENV}
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.prune_train",
      "--config=experiments/configs/gpt.py",
      f"--out_dir={tmp_path}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert out.returncode != 0 and "pass --text_dir" in out.stderr
  assert not os.listdir(tmp_path)


def test_score_batches_of_text_are_token_windows():
  source = datasource.DataSource(synthetic=True, num_examples=5000)
  batches = source.score_batches("text", num_batches=2, batch_size=4, seed=0, input_shape=(16,))
  assert [b["tokens"].shape for b in batches] == [(4, 17), (4, 17)]
  assert batches[0]["tokens"].dtype == np.int32
  with pytest.raises(ValueError, match=r"need the model's context, input_shape=\(T,\)"):
    source.score_batches("text", num_batches=1, batch_size=4, seed=0)
