"""Typed errors that callers branch on (never on the text of a message)."""

from __future__ import annotations


class UnreachableSparsityError(ValueError):
  """A target sparsity that a pruner cannot reach.

  Raised for an effective target beyond every connected mask of a ranking, and for
  a direct target beyond what a quota allows (uniform+ keeps the first layer dense).

  Attributes:
    sparsity: the requested sparsity.
    max_sparsity: the largest sparsity that can be reached (of the same kind: direct
      for a quota limit, effective for an effective target).
  """

  def __init__(self, message: str, *, sparsity: float, max_sparsity: float):
    super().__init__(message)
    self.sparsity = float(sparsity)
    self.max_sparsity = float(max_sparsity)

  @property
  def max_compression(self) -> float:
    """1 / (1 - max_sparsity): the largest reachable compression."""
    return float("inf") if self.max_sparsity >= 1.0 else 1.0 / (1.0 - self.max_sparsity)


class CompactionMismatchError(ValueError):
  """A compacted network that does not compute the masked network's function
  (:mod:`sparsejax.compact`).

  Attributes:
    max_diff: max |logit difference| (inference mode).
    scale: max |logit| of the masked original.
  """

  def __init__(self, message: str, *, max_diff: float, scale: float):
    super().__init__(message)
    self.max_diff = float(max_diff)
    self.scale = float(scale)


class FieldError(ValueError):
  """A field of a settings record (e.g. :class:`sparsejax.training.TrainConfig`) whose
  value is not allowed; a caller that knows where the value came from (a command-line
  flag, a config file) names that place from the attributes.

  Attributes:
    field: the field's name.
    value: the value given.
    allowed: what is allowed, as a phrase after "must be" (e.g. "a finite number > 0").
  """

  def __init__(self, field: str, value, allowed: str):
    super().__init__(f"{field}={value!r} must be {allowed}.")
    self.field = field
    self.value = value
    self.allowed = allowed


__all__ = ["UnreachableSparsityError", "CompactionMismatchError", "FieldError"]
