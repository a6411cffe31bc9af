"""The experiments' result files: their schemas, writers and readers, in one place.

Jobs write and plots read through this module only, and it imports no JAX: the plots
run without it.

- result.json (experiments.prune_train): written as strict JSON
  (:func:`atomic_write_json`), read back parsed and checked (:func:`load`).
- CSV tables (:func:`write_csv`): the compression table of experiments.compression
  and experiments.init_curves (:data:`COMPRESSION_COLUMNS`,
  :func:`read_compression_csv`) and the latency table of
  experiments.compaction_latency (:data:`LATENCY_COLUMNS`, :func:`read_latency_csv`).
- Markdown: the generated tables of docs/ (:func:`markdown_table`,
  :func:`update_markdown_section`).

A run's result is done only when it parses as strict JSON and holds what its status
needs (:func:`load`); a torn or hand-broken file is an :class:`InvalidResultError`,
which the sweep answers by moving the file aside (:func:`move_aside`) and running the
point again, and the plots by naming the file.

Statuses (prune_train):
- ``ok``: trained; accuracy and compressions recorded.
- ``disconnected``: trained, but no input-output path is left (effective
  compression infinite, stored as null).
- ``unreachable``: the effective target is beyond the pruner's ranking; not trained.
- ``diverged``: training stopped at a non-finite loss or parameter
  (``diverged_step``); no accuracy.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import sys
import time
from typing import Any

import numpy as np
from absl import logging

STATUSES = ("ok", "disconnected", "unreachable", "diverged")
_CONFIG_FIELDS = (
  "arch",
  "dataset",
  "pruner",
  "pruning_type",
  "seed",
  "target_compression",
  "train",
)


class InvalidResultError(ValueError):
  """A result.json that does not parse or lacks what its status needs."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: invalid result ({reason}).")
    self.path = path
    self.reason = reason


def _reject_constant(name: str):
  raise ValueError(f"{name} is not strict JSON")


def _number(r: dict, key: str, *, allow_none: bool = False) -> str | None:
  value = r.get(key)
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return f"{key}={value!r}, expected a finite number"
  return None


def check(r: Any) -> str | None:
  """Why the parsed record ``r`` is not a complete result, or None when it is."""
  if not isinstance(r, dict):
    return f"top level is {type(r).__name__}, expected an object"
  config = r.get("config")
  if not isinstance(config, dict):
    return "no 'config' object"
  missing = [k for k in _CONFIG_FIELDS if k not in config]
  if missing:
    return f"config lacks {', '.join(missing)}"
  if not isinstance(config["train"], dict) or "train_steps" not in config["train"]:
    return "config.train lacks train_steps"
  status = r.get("status")
  if status not in STATUSES:
    return f"status={status!r}, expected one of {', '.join(STATUSES)}"
  if status == "unreachable":
    return None if isinstance(r.get("error"), str) else "unreachable without 'error'"
  if status == "diverged":
    step = r.get("diverged_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      return f"diverged_step={step!r}, expected a step number"
    return None
  for key in ("test_accuracy", "test_loss", "direct_compression"):
    why = _number(r, key)
    if why:
      return why
  why = _number(r, "effective_compression", allow_none=status == "disconnected")
  if why:
    return why
  for key in ("test_bits_per_byte", "test_perplexity"):  # a language model's
    why = _number(r, key) if key in r else None
    if why:
      return why
  if not isinstance(r.get("history"), list):
    return "no 'history' list"
  return None


def load(path: str) -> dict:
  """The parsed result at ``path``, with ``effective_compression`` back to inf for a
  disconnected run (stored as null).

  Raises:
    FileNotFoundError: no file at ``path``.
    InvalidResultError: the file is not strict JSON or lacks required fields.
  """
  with open(path, "rb") as f:
    payload = f.read()
  try:
    r = json.loads(payload, parse_constant=_reject_constant)
  except (ValueError, UnicodeDecodeError) as err:
    raise InvalidResultError(path, f"not strict JSON: {err}") from None
  why = check(r)
  if why:
    raise InvalidResultError(path, why)
  if r["status"] == "disconnected" and r.get("effective_compression") is None:
    r["effective_compression"] = math.inf
  return r


def is_done(path: str) -> bool:
  """True when ``path`` holds a valid result; an invalid one is reported (naming the
  file) and moved aside so that the run is done again."""
  try:
    load(path)
  except FileNotFoundError:
    return False
  except InvalidResultError as err:
    moved = move_aside(path)
    logging.warning("%s Moved to %s; the run will be done again.", err, moved)
    return False
  return True


def move_aside(path: str) -> str:
  """Renames ``path`` to ``<path>.invalid-<UTC time>`` (kept for inspection); returns
  the new path."""
  stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
  target = f"{path}.invalid-{stamp}"
  n = 1
  while os.path.exists(target):
    n += 1
    target = f"{path}.invalid-{stamp}-{n}"
  os.replace(path, target)
  return target


# ------------------------------------------------------------------ writing


_STANDALONE_FILES = "experiments._sparsejax_files"


def _files():
  """:mod:`sparsejax.files` (atomic writes), resolved when a file is written. A process
  that imported sparsejax uses that module; one that did not (``python -m
  experiments.plot``) loads the same file alone, because ``import sparsejax.files``
  first runs the package's ``__init__``, which imports JAX and Flax."""
  module = sys.modules.get("sparsejax.files")
  if module is None:
    module = sys.modules.get(_STANDALONE_FILES)
  if module is None:
    package = importlib.util.find_spec("sparsejax")  # located, not imported
    path = os.path.join(package.submodule_search_locations[0], "files.py")
    spec = importlib.util.spec_from_file_location(_STANDALONE_FILES, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_STANDALONE_FILES] = module
  return module


def atomic_write(path: str, payload: bytes) -> None:
  """:func:`sparsejax.files.atomic_write`: ``payload`` to ``path`` through a temp file
  and a rename (a reader sees the old file or the new one)."""
  _files().atomic_write(path, payload)


def check_writable_dir(path: str) -> None:
  """:func:`sparsejax.files.check_writable_dir`: creates the folder ``path`` if missing
  and writes a file in it; OSError if it cannot."""
  _files().check_writable_dir(path)


def strict_json(obj: Any) -> Any:
  """``obj`` with every non-finite float (NaN, +-inf, numpy ones too) as None and numpy
  or JAX scalars/arrays as Python values: what a strict JSON parser accepts. A record
  that holds such a value says why in its ``status`` (e.g. 'disconnected': infinite
  effective compression)."""
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  # NumPy and JAX arrays (JAX is not imported here: the plots run without it).
  if isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")):
    return strict_json(np.asarray(obj).tolist())
  return obj


def atomic_write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict JSON (non-finite floats as null, see :func:`strict_json`),
  atomically; the one JSON writer of the experiments."""
  atomic_write(
    path,
    (
      json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False, default=_jsonable)
      + "\n"
    ).encode(),
  )


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


# ------------------------------------------------------------------ CSV tables

#: experiments.compression and experiments.init_curves: one row per pruner, pruning
#: type and target compression.
COMPRESSION_COLUMNS = [
  "arch",
  "pruner",
  "pruning_type",
  "seed",
  "target_compression",
  "direct_compression",
  "effective_compression",
  "direct_sparsity",
  "effective_sparsity",
  "active_units",
  "total_units",
  "active_units_per_layer",
  "unit_layers",
  "status",
  "seconds",
  "ranking_seconds",
  # FLOPs (2 per multiply-accumulate, one example) and kernel parameters
  "flops_dense",
  "flops_direct",
  "flops_effective",
  "params_dense",
  "params_direct",
  "params_effective",
  # with --compact: the compacted network (sparsejax.compact)
  "compact_widths",
  "live_channel_fraction",
  "compact_params",
  "compact_flops",
  "compact_flops_direct",
  "compact_logit_rel_diff",
  # where the scores' data came from ('-': the pruner reads none)
  "data",
  # the zoo's transformers: 'dead/total' of the effective masks
  # (sparsejax.models.transformer.dead_parts)
  "dead_heads",
  "dead_mlp_neurons",
  "dead_embedding_dims",
]
_COMPRESSION_TEXT = (
  "arch",
  "pruner",
  "pruning_type",
  "status",
  "active_units_per_layer",
  "unit_layers",
  "data",
  "compact_widths",
  "dead_heads",
  "dead_mlp_neurons",
  "dead_embedding_dims",
)

#: experiments.compaction_latency: one row per trained run, re-created and timed.
LATENCY_COLUMNS = [
  "run",
  "arch",
  "pruner",
  "pruning_type",
  "seed",
  "target_compression",
  "train_steps",
  "status",
  "reason",
  "test_accuracy",
  "recorded_effective_compression",
  "effective_compression",
  "reproduced",
  "widths_before",
  "widths",
  "live_channel_fraction",
  "flops_dense",
  "flops_effective",
  "compact_flops",
  "params_dense",
  "params_effective",
  "compact_params",
  "network_bytes",
  "compact_network_bytes",
  "logits_relative_difference",
  "masked_latency_ms",
  "compact_latency_ms",
  "latency_speedup",
  "masked_throughput",
  "compact_throughput",
  "throughput_speedup",
  "batch",
  "repeats",
  "load_average",
  "platform",
  "seconds",
]
_LATENCY_TEXT = (
  "run",
  "arch",
  "pruner",
  "pruning_type",
  "status",
  "reason",
  "widths_before",
  "widths",
  "platform",
  "reproduced",
)

#: The one-shot pruners whose trained runs experiments.compaction_latency times by
#: default, and that the speed figure draws: unstructured (compacted after pruning)
#: against neuron pruners.
LATENCY_UNSTRUCTURED = (
  "random/uniform",
  "random/erk",
  "random/igq",
  "random/snip",
  "random/synflow",
  "snip",
  "snip/iterative",
  "grasp",
  "synflow",
)
LATENCY_NEURON = (
  "neuron/l1",
  "neuron/magnitude",
  "neuron/snip",
  "neuron/synflow",
  "neuron/random",
)


def write_csv(path: str, rows: list[dict], columns: list[str]) -> None:
  """Writes ``rows`` (their ``columns``; other keys ignored, missing ones empty) to
  ``path`` atomically."""
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  atomic_write(path, buf.getvalue().encode())


def _read_csv(path: str, text: tuple) -> list[dict]:
  """Rows with every column not in ``text`` parsed as a float (inf stays inf; an empty
  cell is None: not measured)."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  for r in rows:
    for k, v in r.items():
      if k not in text:
        r[k] = None if v in ("", None) else float(v)
  return rows


def read_compression_csv(path: str) -> list[dict]:
  """The rows of a compression table (:data:`COMPRESSION_COLUMNS`), numbers parsed back."""
  return _read_csv(path, _COMPRESSION_TEXT)


def read_latency_csv(path: str) -> list[dict]:
  """The rows of a latency table (:data:`LATENCY_COLUMNS`), numbers parsed back and
  ``reproduced`` a bool (None when not measured)."""
  rows = _read_csv(path, _LATENCY_TEXT)
  for r in rows:
    r["reproduced"] = {"True": True, "False": False}.get(r["reproduced"])
  return rows


# ------------------------------------------------------------------ markdown


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
  atomic_write(path, text.encode())
