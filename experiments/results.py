"""Reading result.json files back: parsed, checked, and a typed error naming the file.

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

import json
import math
import os
import time
from typing import Any

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
