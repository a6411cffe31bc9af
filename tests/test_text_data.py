"""The byte-level ``text`` dataset: splits from a folder, synthetic text, training windows
as a pure function of (seed, step), evaluation windows that predict every byte once."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from sparsejax import data

REAL = "/work/shared/data/text/python-docs"


def write_corpus(folder, splits=data.TEXT_SPLITS, size=600, compress=True):
  rng = np.random.default_rng(0)
  out = {}
  for split in splits:
    raw = rng.integers(32, 127, size).astype(np.uint8).tobytes()
    out[split] = raw
    if compress:
      with gzip.open(os.path.join(folder, f"{split}.txt.gz"), "wb") as f:
        f.write(raw)
    else:
      with open(os.path.join(folder, f"{split}.txt"), "wb") as f:
        f.write(raw)
  return out


def test_the_text_spec_is_a_dataset_beside_the_image_ones():
  spec = data.get_spec("text")
  assert isinstance(spec, data.TextSpec) and "text" not in data.DATASETS
  assert (spec.vocab_size, spec.num_classes, spec.splits) == (256, 256, ("train", "valid", "test"))
  hash(spec)  # a static jit argument
  with pytest.raises(ValueError, match="'text' is byte-level text, not images"):
    data.synthetic_split("text", "train")
  with pytest.raises(ValueError, match="'text' is byte-level text, not images"):
    data.normalize(np.zeros((1, 2, 2, 1), np.uint8), "text")
  with pytest.raises(ValueError, match="name='mnist' is an image dataset"):
    data.load_text("mnist", "train", text_dir="/nonexistent")


@pytest.mark.parametrize("compress", [True, False])
def test_splits_are_read_from_a_folder_or_the_environment(tmp_path, monkeypatch, compress):
  raw = write_corpus(tmp_path, compress=compress)
  for split in data.TEXT_SPLITS:
    got = data.load_text("text", split, text_dir=str(tmp_path))
    assert got.dtype == np.uint8 and got.tobytes() == raw[split]
  monkeypatch.setenv(data.TEXT_DIR_ENV, str(tmp_path))
  assert data.load_text("text", "valid").tobytes() == raw["valid"]


def test_missing_text_is_named(tmp_path, monkeypatch):
  monkeypatch.delenv(data.TEXT_DIR_ENV, raising=False)
  with pytest.raises(data.MissingDataError, match=r"pass text_dir \(the --text_dir flag\)"):
    data.load_text("text", "train")
  write_corpus(tmp_path, splits=("train",))
  with pytest.raises(data.MissingDataError, match=r"neither test.txt.gz nor test.txt"):
    data.load_text("text", "test", text_dir=str(tmp_path))
  with pytest.raises(ValueError, match="split='validation' is not allowed"):
    data.load_text("text", "validation", text_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(REAL), reason="the shared corpus is not here")
def test_the_real_corpus_has_the_sizes_its_readme_gives():
  sizes = {s: data.load_text("text", s, text_dir=REAL).size for s in data.TEXT_SPLITS}
  assert sizes == {"train": 9_981_433, "valid": 454_216, "test": 612_626}


def test_synthetic_text_is_deterministic_shares_its_language_and_is_learnable():
  a = data.synthetic_text("text", "train", 4096, seed=1)
  assert a.dtype == np.uint8 and a.shape == (4096,)
  np.testing.assert_array_equal(a, data.synthetic_text("text", "train", 4096, seed=1))
  assert not np.array_equal(a, data.synthetic_text("text", "train", 4096, seed=2))
  test = data.synthetic_text("text", "test", seed=1)
  assert test.shape == (8192,) and not np.array_equal(test[:4096], a)
  words = lambda x: set(x.tobytes().split()[:-1])  # the last one may be cut
  assert words(test) <= words(data.synthetic_text("text", "train", seed=1))  # one vocabulary
  assert set(np.unique(a)) <= set(b"abcdefghijklmnopqrstuvwxyz \n")


def test_training_windows_are_a_pure_function_of_seed_and_step():
  n, t, b = 1000, 9, 8  # M = (1000 - 9) // 10 = 99 windows, 12 steps per epoch
  assert data.num_train_windows(n, t) == 99
  first = [data.window_starts(n, t, b, 3, s) for s in range(30)]
  again = [data.window_starts(n, t, b, 3, s) for s in reversed(range(30))][::-1]
  for x, y in zip(first, again, strict=True):
    np.testing.assert_array_equal(x, y)
  for epoch in range(2):
    starts = np.concatenate(first[12 * epoch : 12 * epoch + 12])
    offsets = starts % (t + 1)
    assert len(set(offsets)) == 1 and 0 <= offsets[0] <= t  # one offset per epoch
    assert len(set(starts)) == 96  # no window twice in an epoch
    assert starts.max() + t + 1 <= n
  assert not np.array_equal(first[0], data.window_starts(n, t, b, 4, 0))
  with pytest.raises(ValueError, match="needs at least 19 bytes"):
    data.num_train_windows(18, 9)
  with pytest.raises(ValueError, match="context=0"):
    data.num_train_windows(100, 0)


def test_training_batches_hold_windows_of_context_plus_one_bytes_and_resume():
  corpus = np.arange(1000, dtype=np.int64).astype(np.uint8)
  full = list(data.text_train_batches(corpus, 9, 4, seed=0, prefetch=0, num_steps=5))
  resumed = list(data.text_train_batches(corpus, 9, 4, 0, start_step=3, prefetch=0, num_steps=2))
  for x, y in zip(full[3:], resumed, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  tokens = np.asarray(full[0]["tokens"])
  assert tokens.shape == (4, 10) and tokens.dtype == np.uint8
  start = data.window_starts(1000, 9, 4, 0, 0)
  np.testing.assert_array_equal(tokens, corpus[start[:, None] + np.arange(10)])
  # the threaded prefetch gives the same batches
  threaded = list(data.text_train_batches(corpus, 9, 4, seed=0, prefetch=2, num_steps=5))
  for x, y in zip(full, threaded, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])


@pytest.mark.parametrize("n,t,b", [(50, 8, 4), (49, 8, 3), (9, 8, 2), (2, 5, 1), (300, 7, 64)])
def test_evaluation_predicts_every_byte_after_the_first_exactly_once(n, t, b):
  corpus = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
  targets, sources = [], []
  for batch in data.text_eval_batches(corpus, t, b, prefetch=0):
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    assert tokens.shape == (b, t + 1) and mask.shape == (b, t)
    targets.append(tokens[:, 1:][mask])
    sources.append(tokens[:, :-1][mask])
  np.testing.assert_array_equal(np.concatenate(targets), corpus[1:])  # in order, once each
  np.testing.assert_array_equal(np.concatenate(sources), corpus[:-1])  # its previous byte
  assert data.num_eval_windows(n, t) == -(-(n - 1) // t)


def test_importing_the_text_data_loads_no_tensorflow(tmp_path):
  write_corpus(tmp_path)
  code = (
    "import sys; from sparsejax import data; "
    f"data.load_text('text', 'train', text_dir={str(tmp_path)!r}); "
    "print([m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')])"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
