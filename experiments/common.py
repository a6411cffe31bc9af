"""Pieces the experiment binaries share: atomic files, data for scores, flags."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from sparsejax import data


def _umask() -> int:
  """The process umask, read without changing it where Linux allows (os.umask sets it
  process-wide, which threads writing files at the same moment would see)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str, payload: bytes) -> None:
  """Writes ``payload`` to ``path`` via a temp file and rename: never a half file.

  The file gets the mode a plain ``open(path, 'w')`` would (0666 less the umask, e.g.
  0644), not the 0600 of the temp file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
      os.fchmod(f.fileno(), 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def strict_json(obj: Any) -> Any:
  """``obj`` with every non-finite float (NaN, +-inf, numpy ones too) as None and numpy
  scalars/arrays as Python values: what a strict JSON parser accepts. A record that
  holds such a value says why in its ``status`` (e.g. 'disconnected': infinite
  effective compression)."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, (np.ndarray, jax.Array)):
    return strict_json(np.asarray(obj).tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  return obj


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict JSON (non-finite floats as null, see :func:`strict_json`),
  atomically; the one JSON writer of the experiments."""
  atomic_write_bytes(path, (json.dumps(strict_json(obj), indent=2, sort_keys=True,
                                       allow_nan=False, default=_jsonable) + "\n").encode())


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
  if not 0 <= sparsity < 1:
    raise ValueError(f"sparsity={sparsity!r} must be in [0, 1) to name a run (compression "
                     "1 / (1 - sparsity) must be finite).")
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


# ------------------------------------------------------------- flag checks
# Every binary checks its numeric flags and its out_dir before any work (pruning can
# take minutes), naming the flag, its value and what is allowed.


def check_int_flag(name: str, value, *, low: int = 1, allow_none: bool = False) -> None:
  """Raises ValueError unless ``value`` is an integer >= ``low`` (or None if allowed).
  ``0`` is a value, not "not given"."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"--{name}={value!r} must be an integer >= {low}"
                     + (" (or not given)." if allow_none else "."))


def check_compression_flag(name: str, value) -> float:
  """A target compression: a finite number >= 1 (1 = dense); returns it as a float."""
  try:
    c = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"--{name}={value!r} must be a number >= 1.") from None
  if not (math.isfinite(c) and c >= 1):
    raise ValueError(f"--{name}={value!r} must be a finite number >= 1 (1 = dense; "
                     "100 = 99% sparse).")
  return c


def check_writable_dir(name: str, path: str) -> None:
  """Creates ``path`` if needed and checks a file can be written in it."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as err:
    raise ValueError(f"--{name}={path!r} is not a writable folder: {err.strerror or err}."
                     ) from None


def _values(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def check_run_args(*, out_dir: str | None = None, compressions: dict | None = None,
                   counts: dict | None = None, optional_counts: dict | None = None,
                   nonnegative: dict | None = None) -> None:
  """Checks a binary's flags before any work. Each argument maps flag names to a value
  or a list of values: ``compressions`` finite >= 1, ``counts`` integers >= 1,
  ``optional_counts`` the same or None, ``nonnegative`` integers >= 0 (seeds, steps);
  ``out_dir`` must be a folder that can be written (created if missing).

  Raises:
    ValueError: naming the first bad flag, its value and what is allowed.
  """
  for name, value in (compressions or {}).items():
    for v in _values(value):
      check_compression_flag(name, v)
  for name, value in (counts or {}).items():
    for v in _values(value):
      check_int_flag(name, v)
  for name, value in (optional_counts or {}).items():
    for v in _values(value):
      check_int_flag(name, v, allow_none=True)
  for name, value in (nonnegative or {}).items():
    for v in _values(value):
      check_int_flag(name, v, low=0)
  if out_dir is not None:
    check_writable_dir("out_dir", out_dir)
