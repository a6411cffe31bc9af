"""Pieces the experiment binaries share: result files, data sources, flags, run names."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from typing import Any

import jax
import numpy as np
from absl import flags, logging

from sparsejax import data, dynamic, files, masks, pruning

#: Iterative magnitude pruning with rewinding: a training procedure of
#: experiments.prune_train, not a ranking, so not in the pruner registry.
IMP = "imp"
#: Masks that move during training: the registry of sparsejax.dynamic (gradual
#: magnitude pruning, SET, RigL, STE and any registered method), by name. Training
#: procedures too. The registry itself, so `name in DYNAMIC` sees later registrations.
DYNAMIC = dynamic.METHODS


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
  files.atomic_write(
    path,
    (
      json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False, default=_jsonable)
      + "\n"
    ).encode(),
  )


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
  files.atomic_write(path, text.encode())


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=8)
def load_data(
  dataset: str,
  split: str,
  *,
  synthetic: bool,
  manual_dir: str | None,
  data_dir: str | None,
  seed: int = 0,
  num_examples: int | None = None,
):
  """(images uint8, labels int32) of a split: real (TFDS, offline from manual_dir) or
  synthetic data of the same shapes. Cached: the runs of an in-process sweep read a
  split once (callers must not modify the arrays)."""
  if synthetic:
    return data.synthetic_split(dataset, split, num_examples=num_examples, seed=seed)
  return data.load_split(dataset, split, data_dir=data_dir, manual_dir=manual_dir)


@dataclasses.dataclass(frozen=True)
class DataSource:
  """Where a binary's data comes from: TFDS (prepared offline from ``manual_dir``) or
  synthetic data of the same shapes (``num_examples`` per split, synthetic only)."""

  synthetic: bool = False
  manual_dir: str | None = None
  data_dir: str | None = None
  num_examples: int | None = None

  @classmethod
  def from_flags(cls) -> DataSource:
    """From --synthetic_data, --tfds_manual_dir and --tfds_data_dir."""
    return cls(
      synthetic=flags.FLAGS.synthetic_data,
      manual_dir=flags.FLAGS.tfds_manual_dir,
      data_dir=flags.FLAGS.tfds_data_dir,
    )

  def split(self, dataset: str, split: str, seed: int = 0):
    """(images uint8 [N, H, W, C], labels int32 [N]) of a split (cached, read-only)."""
    return load_data(
      dataset,
      split,
      synthetic=self.synthetic,
      manual_dir=self.manual_dir,
      data_dir=self.data_dir,
      seed=seed,
      num_examples=self.num_examples if self.synthetic else None,
    )

  def score_batches(
    self, dataset: str, *, num_batches: int, batch_size: int, seed: int
  ) -> list[dict]:
    """Preprocessed (normalized, not augmented) training batches for data-driven
    scores (SNIP, iterative SNIP, GraSP): a list of {'image': float32 NHWC, 'label':
    int32}. Batch s is :func:`sparsejax.data.batch_indices` of (seed, s).

    A ``batch_size`` above the split's size: synthetic data (a smoke-test stand-in,
    1024 training examples by default) scores on the whole split instead, with a
    warning (VGG-19's SNIP batch is 1280, ResNet-18's 2560); real data raises a
    ValueError naming both sizes."""
    images, labels = self.split(dataset, "train", seed)
    if batch_size > len(images):
      if not self.synthetic:
        raise ValueError(
          f"batch_size={batch_size} (score batch, e.g. the config's "
          f"snip_batch_size) exceeds the {len(images)} examples of {dataset} "
          "train; pass a smaller score batch size."
        )
      logging.warning(
        "Score batch size %d exceeds the %d synthetic %s training examples; "
        "scoring on batches of %d.",
        batch_size,
        len(images),
        dataset,
        len(images),
      )
      batch_size = len(images)
    spec = data.get_spec(dataset)
    batches = []
    for step in range(num_batches):
      idx = data.batch_indices(len(images), batch_size, seed, step)
      x = data.preprocess(jax.random.key(0), images[idx], spec, False)
      batches.append({"image": x, "label": labels[idx]})
    logging.info(
      "Score data: %d batches of %d from %s %s.",
      num_batches,
      batch_size,
      "synthetic" if self.synthetic else "TFDS",
      dataset,
    )
    return batches

  def describe(self, dataset: str) -> str:
    return f"synthetic {dataset}" if self.synthetic else f"{dataset} (TFDS)"


def define_data_flags() -> None:
  flags.DEFINE_bool(
    "synthetic_data", False, "Use synthetic data of the dataset's shapes instead of TFDS."
  )
  flags.DEFINE_string(
    "tfds_manual_dir",
    None,
    "Folder with the raw dataset files for offline TFDS preparation "
    f"(default ${data.MANUAL_DIR_ENV}); e.g. ../shared/data/mnist.",
  )
  flags.DEFINE_string(
    "tfds_data_dir",
    None,
    f"Where TFDS keeps prepared data (default ${data.DATA_DIR_ENV}, then ~/tensorflow_datasets).",
  )


def default_compilation_cache_dir() -> str:
  """$XDG_CACHE_HOME/sparsejax/jax (default ~/.cache/sparsejax/jax)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sparsejax", "jax")


def define_compilation_cache_flags() -> None:
  flags.DEFINE_string(
    "compilation_cache_dir",
    default_compilation_cache_dir(),
    "JAX's persistent compilation cache: a later process loads the "
    "compiled programs (sweeps, scores, steps) instead of compiling them "
    "again. Empty: off.",
  )
  flags.DEFINE_bool(
    "compilation_cache", True, "Use the persistent compilation cache (--nocompilation_cache: off)."
  )


def enable_compilation_cache(directory: str | None, enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache in ``directory`` for every program
  (also the ones that compile in under a second); returns the directory, or None
  when off (``enabled`` False or an empty directory). The library never does this: it
  is the binary's choice."""
  if not enabled or not directory:
    return None
  directory = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as err:
    raise ValueError(
      f"--compilation_cache_dir={directory!r} cannot be created ({err}); "
      "give a writable folder, or --nocompilation_cache."
    ) from None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  return directory


def compilation_cache_from_flags() -> str | None:
  """:func:`enable_compilation_cache` as the flags of
  :func:`define_compilation_cache_flags` say."""
  return enable_compilation_cache(flags.FLAGS.compilation_cache_dir, flags.FLAGS.compilation_cache)


def target_sparsity(config) -> float:
  """The run's target sparsity from ``config.compression`` or ``config.target_sparsity``
  (neither: 0, the dense network), validated and naming the field."""
  compression, sparsity = config.compression, config.target_sparsity
  if compression is not None and sparsity is not None:
    raise ValueError("give either --config.compression or --config.target_sparsity, not both.")
  if compression is not None:
    return 1.0 - 1.0 / check_compression_flag("config.compression", compression)
  if sparsity is None:
    return 0.0
  return masks.check_sparsity(sparsity, "--config.target_sparsity")


def check_pruner(name: str) -> pruning.Pruner | None:
  """The registered pruner ``name``, or None for a training procedure ('imp' and the
  :data:`DYNAMIC` ones); ValueError for anything else."""
  if name == IMP or name in DYNAMIC:
    return None
  if name not in pruning.PRUNERS:
    raise ValueError(
      f"pruner={name!r} is not a known pruner; allowed: "
      f"{', '.join(pruning.PRUNERS)}, {IMP}, {', '.join(DYNAMIC)}."
    )
  return pruning.PRUNERS[name]


def after_training(name: str) -> bool:
  """The pruner scores the weights of a matching dense run (IMP trains its own)."""
  p = check_pruner(name)
  return p is not None and p.after_training


def run_name(config) -> str:
  """The folder name of a run: network, dataset, pruner, type, target, seed, steps, and
  ``_compact`` when the compacted network trains (``config.compact``)."""
  compression = 1.0 / (1.0 - target_sparsity(config))
  compact = config.get("compact", False)
  return (
    f"{config.arch}-{config.dataset}_{config.pruner.replace('/', '-')}_"
    f"{config.pruning_type}_c{compression:.4g}_s{config.seed}_t{config.train_steps}"
    + ("_compact" if compact else "")
  )


def parse_list(value: str, cast=str, name: str = "list") -> list:
  items = [v.strip() for v in value.split(",") if v.strip()]
  try:
    return [cast(v) for v in items]
  except ValueError:
    raise ValueError(
      f"--{name}={value!r} is not a comma-separated list of {cast.__name__} values."
    ) from None


# ------------------------------------------------------------- flag checks
# Every binary checks its numeric flags and its out_dir before any work (pruning can
# take minutes), naming the flag, its value and what is allowed.


def check_int_flag(name: str, value, *, low: int = 1, allow_none: bool = False) -> None:
  """Raises ValueError unless ``value`` is an integer >= ``low`` (or None if allowed).
  ``0`` is a value, not "not given"."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(
      f"--{name}={value!r} must be an integer >= {low}"
      + (" (or not given)." if allow_none else ".")
    )


def check_compression_flag(name: str, value) -> float:
  """A target compression: a finite number >= 1 (1 = dense); returns it as a float."""
  try:
    c = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"--{name}={value!r} must be a number >= 1.") from None
  if not (math.isfinite(c) and c >= 1):
    raise ValueError(
      f"--{name}={value!r} must be a finite number >= 1 (1 = dense; 100 = 99% sparse)."
    )
  return c


def check_writable_dir(name: str, path: str) -> None:
  """Creates ``path`` if needed and checks a file can be written in it."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
      pass
  except OSError as err:
    raise ValueError(
      f"--{name}={path!r} is not a writable folder: {err.strerror or err}."
    ) from None


def _values(value) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value]


def check_run_args(
  *,
  out_dir: str | None = None,
  compressions: dict | None = None,
  counts: dict | None = None,
  optional_counts: dict | None = None,
  nonnegative: dict | None = None,
) -> None:
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
