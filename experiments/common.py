"""Pieces the experiment binaries share: atomic files, data for scores, flags."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from sparsejax import data


def atomic_write_bytes(path: str, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` via a temp file and rename: never a half file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
                            + "\n").encode())


def markdown_table(header: list[str], rows: list[list]) -> str:
  """A GitHub-flavoured markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def update_markdown_section(path: str, name: str, body: str, title: str = "") -> None:
  """Replaces the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in
  the markdown file ``path`` (appending the section if absent; creating the file with
  ``title`` if missing), atomically, leaving the rest of the file untouched."""
  start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
  text = open(path).read() if os.path.exists(path) else title
  block = f"{start}\n{body.strip()}\n{end}"
  if start in text and end in text:
    before, rest = text.split(start, 1)
    text = before + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  atomic_write_bytes(path, text.encode())


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=8)
def load_data(dataset: str, split: str, *, synthetic: bool, manual_dir: str | None,
              data_dir: str | None, seed: int = 0, num_examples: int | None = None):
  """(images uint8, labels int32) of a split: real (TFDS, offline from manual_dir) or
  synthetic data of the same shapes. Cached: the runs of an in-process sweep read a
  split once (callers must not modify the arrays)."""
  if synthetic:
    return data.synthetic_split(dataset, split, num_examples=num_examples, seed=seed)
  return data.load_split(dataset, split, data_dir=data_dir, manual_dir=manual_dir)


def score_batches(dataset: str, *, num_batches: int, batch_size: int, seed: int,
                  synthetic: bool, manual_dir: str | None, data_dir: str | None
                  ) -> list[dict]:
  """Preprocessed (normalized, not augmented) training batches for data-driven scores
  (SNIP, iterative SNIP, GraSP): a list of {'image': float32 NHWC, 'label': int32}."""
  images, labels = load_data(dataset, "train", synthetic=synthetic, manual_dir=manual_dir,
                             data_dir=data_dir, seed=seed)
  spec = data.get_spec(dataset)
  batches = []
  for step in range(num_batches):
    idx = data.batch_indices(len(images), batch_size, seed, step)
    x = data.preprocess(jax.random.key(0), images[idx], spec, False)
    batches.append({"image": x, "label": labels[idx]})
  logging.info("Score data: %d batches of %d from %s %s.", num_batches, batch_size,
               "synthetic" if synthetic else "TFDS", dataset)
  return batches


def define_data_flags() -> None:
  flags.DEFINE_bool("synthetic_data", False,
                    "Use synthetic data of the dataset's shapes instead of TFDS.")
  flags.DEFINE_string("tfds_manual_dir", None,
                      "Folder with the raw dataset files for offline TFDS preparation "
                      f"(default ${data.MANUAL_DIR_ENV}); e.g. ../shared/data/mnist.")
  flags.DEFINE_string("tfds_data_dir", None,
                      f"Where TFDS keeps prepared data (default ${data.DATA_DIR_ENV}, then "
                      "~/tensorflow_datasets).")


def run_name(arch: str, dataset: str, pruner: str, pruning_type: str, sparsity: float,
             seed: int, train_steps: int) -> str:
  compression = 1.0 / (1.0 - sparsity)
  return (f"{arch}-{dataset}_{pruner.replace('/', '-')}_{pruning_type}_"
          f"c{compression:.4g}_s{seed}_t{train_steps}")


def parse_list(value: str, cast=str, name: str = "list") -> list:
  items = [v.strip() for v in value.split(",") if v.strip()]
  try:
    return [cast(v) for v in items]
  except ValueError:
    raise ValueError(f"--{name}={value!r} is not a comma-separated list of "
                     f"{cast.__name__} values.") from None
