"""Pruning scores (method.md section 4): one number per prunable weight, higher = kept first.

Every function returns a *score tree*: shaped like ``params``, with an array of the
weight's shape at every prunable leaf and ``None`` elsewhere, ready for
:func:`sparsejax.ranking.rank_scores`. One-shot scores are float32; iterative pruners
(:func:`iterative_snip`, :func:`synflow`) return int32 elimination priorities
(:mod:`sparsejax.scores.rounds`).

Argument convention: ``(model, variables, [batches], *, keywords)`` for the scores that
read a model (``model`` a Flax module, a function or a :class:`sparsejax.Traced`), and
``(params, *, prunable=, ...)`` for those read off the weights; ``prunable`` is a
collection of '/'-joined paths (the traced program's linear-op weights).

Modules: :mod:`~sparsejax.scores.weights` (random, magnitude, LAMP),
:mod:`~sparsejax.scores.data` (SNIP, iterative SNIP, GraSP),
:mod:`~sparsejax.scores.calibration` (after training on calibration data: SparseGPT and
Wanda, which return masks and params at a target, OBD, Taylor),
:mod:`~sparsejax.scores.synflow` (SynFlow), :mod:`~sparsejax.scores.rounds` (the round
driver of iterative pruners), :mod:`~sparsejax.scores.trees` (score trees).
"""

from sparsejax.scores.calibration import obd, sparsegpt, taylor, wanda
from sparsejax.scores.data import (
  cross_entropy,
  grasp,
  grasp_hessian_gradient,
  iterative_snip,
  snip,
)
from sparsejax.scores.rounds import RoundStats
from sparsejax.scores.synflow import synflow, synflow_scores
from sparsejax.scores.weights import lamp, magnitude, random

__all__ = [
  "RoundStats",
  "cross_entropy",
  "grasp",
  "grasp_hessian_gradient",
  "iterative_snip",
  "lamp",
  "magnitude",
  "obd",
  "random",
  "snip",
  "sparsegpt",
  "synflow",
  "synflow_scores",
  "taylor",
  "wanda",
]
