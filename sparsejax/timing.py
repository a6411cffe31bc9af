"""Wall-clock timing of jitted functions, and masked-against-compacted inference.

One helper for the benchmarks (``benchmarks/``), ``experiments.prune_train
--config.compact`` and ``experiments.compaction_latency``:

- :func:`median_seconds`: median wall time of ``fn()`` (results blocked on);
- :func:`alternate`: medians of several functions timed in turns (each repeat times
  every function once), so that a change of machine load hits all of them alike;
- :func:`inference`: jitted inference-mode ``apply`` of several networks on the same
  standard normal input, latency at batch 1 and throughput at a larger batch.

Times depend on the machine and its load: report them with the load (``os.getloadavg``),
never assert on them in tests.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
  """Median wall time of ``fn()`` (results blocked on) after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """{name: median seconds} of every ``fn`` timed in turns, ``repeats`` times each, the
  order reversed every other round so that none always runs first (no warm-up: compile
  first)."""
  if int(repeats) != repeats or repeats < 1:
    raise ValueError(f"repeats={repeats!r} must be an integer >= 1.")
  times, order = {k: [] for k in fns}, list(fns)
  for r in range(repeats):
    for k in order if r % 2 == 0 else order[::-1]:
      times[k].append(median_seconds(fns[k], repeats=1, warmup=0))
  return {k: statistics.median(t) for k, t in times.items()}


def inference(
  networks: dict[str, tuple],
  input_shape,
  *,
  batch: int = 256,
  repeats: int = 20,
  key: jax.Array | None = None,
) -> dict:
  """Inference latency (batch 1) and throughput (batch ``batch``) of each network.

  Args:
    networks: {name: (flax module, variables)}, applied as ``model.apply(variables, x,
      train=False)`` (masked networks: pass the masked variables).
    input_shape: one example's shape without the batch axis.
    batch: the throughput batch.
    repeats: timings per network and batch size (medians; the networks in turns).
    key: PRNG key of the standard normal inputs (default ``jax.random.key(0)``).

  Returns:
    {name: {"latency_ms": median ms of one batch-1 call, "throughput": examples per
    second at ``batch``, "batch_ms": median ms of one ``batch`` call}}.
  """
  if int(batch) != batch or batch < 1:
    raise ValueError(f"batch={batch!r} must be an integer >= 1.")
  key = jax.random.key(0) if key is None else key
  fns = {k: jax.jit(functools.partial(m.apply, train=False)) for k, (m, _) in networks.items()}
  out = {k: {} for k in networks}
  for label, b in (("latency_ms", 1), ("batch_ms", batch)):
    x = jax.random.normal(key, (b,) + tuple(input_shape), jnp.float32)
    calls = {k: functools.partial(fns[k], v, x) for k, (_, v) in networks.items()}
    for fn in calls.values():  # compile
      jax.block_until_ready(fn())
    for k, t in alternate(calls, repeats).items():
      out[k][label] = 1e3 * t
  for k in networks:
    out[k]["throughput"] = batch / (out[k]["batch_ms"] / 1e3)
  return out


def load_average() -> float | None:
  """The 1-minute load average (None where the system has none): report it with times."""
  try:
    return os.getloadavg()[0]
  except OSError:
    return None


__all__ = ["median_seconds", "alternate", "inference", "load_average"]
