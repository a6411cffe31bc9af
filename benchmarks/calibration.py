"""Benchmark: SparseGPT, Wanda and the calibration capture on one large layer, against
NumPy ports of the reference implementations' algorithms, in one run.

The layer: W [1024, 4096] (1024 output units, 4096 inputs), calibration inputs of 128
sequences x 2048 tokens (262,144 rows of 4096 features; the SparseGPT paper's 128
segments of 2048 tokens), drawn as correlated Gaussians from a pool of a few distinct
batches (the data never exists at once: 4 GB). Timed, seconds per layer:

- capture: H = X^T X over all calibration rows (``sparsejax.calibration``'s jitted pass
  on a one-layer model) against the reference's ``SparseGPT.add_batch`` (NumPy port:
  H *= n / (n + b); X *= sqrt(2 / n); H += X^T X, per sequence);
- wanda-capture: the squared input norms only (``stat='diag'``) against Wanda's
  ``WrappedGPT.add_batch`` (the running ``scaler_row``);
- sparsegpt: ``scores.calibration.sparsegpt_layer`` at 50% and 2:4 against the NumPy
  port of ``SparseGPT.fasterprune`` (IST-DASLab/sparsegpt, sparsegpt.py: dead columns,
  1% dampening, ``cholesky`` -> ``cholesky_inverse`` (LAPACK potri, as torch does on
  CPU) -> upper ``cholesky``, lazy blocks of 128 columns with the in-block column loop
  and the trailing block update);
- wanda: ``scores.calibration.wanda_layer`` (per-row at 50%, and 2:4) against the NumPy
  port of Wanda's ``prune_wanda`` mask step (locuslab/wanda, lib/prune.py: a stable
  sort per row; N:M by ``topk`` per group of M columns);

each with the ratio to its baseline measured in the same run. Targets (issue 27):
SparseGPT <= 3 s on this CPU, Wanda well under 1 s.

  python -m benchmarks.calibration                 # prints the table, updates docs/benchmarks.md
  python -m benchmarks.calibration --sequences 8   # a quick look (fewer calibration rows)

The ports below are the reference algorithms step for step (tests/test_calibration.py
checks sparsejax's SparseGPT against :func:`reference_fasterprune`).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from benchmarks import report
from sparsejax import calibration
from sparsejax.scores import calibration as calib_scores

# ------------------------------------------------------------------ reference ports


def reference_add_batch(h: np.ndarray, nsamples: int, inp: np.ndarray) -> int:
  """``SparseGPT.add_batch`` of a Linear layer (in place on float32 ``h``): ``inp`` [b,
  tokens, in] (or [tokens, in]: one sample). Returns the new ``nsamples``."""
  if inp.ndim == 2:
    inp = inp[None]
  tmp = inp.shape[0]
  inp = inp.reshape(-1, inp.shape[-1]).T
  h *= nsamples / (nsamples + tmp)
  nsamples += tmp
  inp = math.sqrt(2 / nsamples) * inp.astype(np.float32)
  h += inp @ inp.T
  return nsamples


def reference_wanda_add_batch(scaler_row: np.ndarray, nsamples: int, inp: np.ndarray) -> int:
  """Wanda's ``WrappedGPT.add_batch`` (in place on ``scaler_row`` [in])."""
  if inp.ndim == 2:
    inp = inp[None]
  tmp = inp.shape[0]
  inp = inp.reshape(-1, inp.shape[-1]).T
  scaler_row *= nsamples / (nsamples + tmp)
  nsamples += tmp
  scaler_row += np.sum(np.square(inp.astype(np.float32)), axis=1) / nsamples
  return nsamples


def reference_fasterprune(
  w: np.ndarray,
  h: np.ndarray,
  sparsity: float,
  prunen: int = 0,
  prunem: int = 0,
  blocksize: int = 128,
  percdamp: float = 0.01,
) -> np.ndarray:
  """``SparseGPT.fasterprune`` (float32, no quantizer): the pruned and updated W. As in
  the reference ``prunen`` is the number *pruned* in every ``prunem`` columns (equal to
  the kept number for 2:4 and 4:8)."""
  w = np.array(w, np.float32)
  h = np.array(h, np.float32)
  rows, columns = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  damp = percdamp * np.mean(np.diag(h))
  diag = np.arange(columns)
  h[diag, diag] += damp
  lower = np.linalg.cholesky(h)
  inv, info = scipy.linalg.lapack.spotri(lower, lower=1)  # torch.cholesky_inverse
  if info:
    raise np.linalg.LinAlgError(f"potri info {info}")
  inv = np.tril(inv) + np.tril(inv, -1).T
  hinv = np.linalg.cholesky(inv).T.astype(np.float32)  # torch.linalg.cholesky(upper=True)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    err1 = np.zeros_like(w1)
    hinv1 = hinv[i1:i2, i1:i2]
    if prunen == 0:
      tmp = w1**2 / (np.diag(hinv1).reshape((1, -1))) ** 2
      thresh = np.sort(tmp.ravel())[int(tmp.size * sparsity)]
      mask1 = tmp <= thresh
    else:
      mask1 = np.zeros_like(w1, dtype=bool)
    for i in range(count):
      col = w1[:, i]
      d = hinv1[i, i]
      if prunen != 0 and i % prunem == 0:
        tmp = w1[:, i : i + prunem] ** 2 / (np.diag(hinv1)[i : i + prunem].reshape((1, -1))) ** 2
        idx = np.argsort(tmp, axis=1, kind="stable")[:, :prunen]  # topk(largest=False)
        group = mask1[:, i : i + prunem]
        np.put_along_axis(group, idx, True, axis=1)
      q = col.copy()
      q[mask1[:, i]] = 0
      q1[:, i] = q
      err = (col - q) / d
      w1[:, i:] -= np.outer(err, hinv1[i, i:])
      err1[:, i] = err
    w[:, i1:i2] = q1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
  return w


def reference_wanda_mask(
  w: np.ndarray, scaler_row: np.ndarray, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> np.ndarray:
  """Wanda's mask step of ``prune_wanda``: True where pruned."""
  metric = np.abs(w) * np.sqrt(scaler_row.reshape((1, -1)))
  mask = np.zeros(metric.shape, bool)
  if prune_n:
    for ii in range(metric.shape[1]):
      if ii % prune_m == 0:
        tmp = metric[:, ii : ii + prune_m]
        idx = np.argsort(tmp, axis=1, kind="stable")[:, :prune_n]
        np.put_along_axis(mask[:, ii : ii + prune_m], idx, True, axis=1)
  else:
    order = np.argsort(metric, axis=-1, kind="stable")
    np.put_along_axis(mask, order[:, : int(metric.shape[1] * sparsity)], True, axis=1)
  return mask


# ------------------------------------------------------------------ the benchmark


def _pool(key, tokens: int, width: int, count: int) -> list:
  """``count`` distinct calibration sequences [1, tokens, width] of correlated Gaussians
  (a random mixing of iid features, plus a per-feature scale)."""
  k1, k2, k3 = jax.random.split(key, 3)
  mix = jax.random.normal(k1, (width, width)) / math.sqrt(width)
  scale = jnp.exp(jax.random.normal(k2, (width,)) * 0.5)
  keys = jax.random.split(k3, count)
  return [
    jax.block_until_ready(
      (
        (jax.random.normal(k, (tokens, width)) @ mix + jax.random.normal(k, (tokens, width)))
        * scale
      )[None]
    )
    for k in keys
  ]


def _seconds(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up (results
  blocked on)."""
  return report.median_seconds(fn, repeats=repeats, warmup=1)


def _once(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def run(
  rows: int = 1024,
  width: int = 4096,
  sequences: int = 128,
  tokens: int = 2048,
  pool: int = 4,
  repeats: int = 3,
) -> list[list]:
  """The table's rows: [what, sparsejax s, baseline s, baseline / sparsejax]."""
  key = jax.random.key(0)
  batches = _pool(key, tokens, width, pool)
  inputs = [batches[i % pool] for i in range(sequences)]
  host = [np.asarray(b) for b in batches]
  w = np.asarray(jax.random.normal(jax.random.key(1), (rows, width)), np.float32)
  params = {"w": jnp.asarray(w.T)}  # a Dense kernel [in, out]
  layer = lambda p, x: x @ p["w"]

  def capture(stat):
    stats = calibration.capture(layer, params, inputs, stat=stat)
    return stats["w"].hessian if stat == "full" else stats["w"].diag

  def ref_capture():
    h, n = np.zeros((width, width), np.float32), 0
    for i in range(sequences):
      n = reference_add_batch(h, n, host[i % pool])
    return h

  def ref_wanda_capture():
    s, n = np.zeros(width, np.float32), 0
    for i in range(sequences):
      n = reference_wanda_add_batch(s, n, host[i % pool])
    return s

  for stat in calibration.STATS:  # compile the passes on one batch
    calibration.capture(layer, params, inputs[:1], stat=stat)
  out = []
  t_diag, t_ref_diag = _once(lambda: capture("diag")), _once(ref_wanda_capture)
  out.append(["capture, squared input norms (Wanda)", t_diag, t_ref_diag])
  start = time.perf_counter()
  h_j = jax.block_until_ready(capture("full"))
  t_full = time.perf_counter() - start
  start = time.perf_counter()
  h_ref = ref_capture()
  out.append(["capture, H = X^T X (SparseGPT)", t_full, time.perf_counter() - start])
  h = np.asarray(h_j)
  diag = np.diagonal(h).copy()
  kept = rows * width // 2
  sg = lambda **kw: calib_scores.sparsegpt_layer(w, h_j, **kw)[0]
  out.append(
    [
      "sparsegpt 50%",
      _seconds(lambda: sg(kept=kept), repeats),
      _seconds(lambda: reference_fasterprune(w, h_ref, 0.5), 1),
    ]
  )
  out.append(
    [
      "sparsegpt 2:4",
      _seconds(lambda: sg(pattern="2:4"), repeats),
      _seconds(lambda: reference_fasterprune(w, h_ref, 0.5, 2, 4), 1),
    ]
  )
  wd = lambda **kw: calib_scores.wanda_layer(w, diag, **kw)
  out.append(
    [
      "wanda 50% (per row)",
      _seconds(lambda: wd(kept=kept), repeats),
      _seconds(lambda: reference_wanda_mask(w, diag, 0.5), repeats),
    ]
  )
  out.append(
    [
      "wanda 2:4",
      _seconds(lambda: wd(pattern="2:4"), repeats),
      _seconds(lambda: reference_wanda_mask(w, diag, 0.5, 2, 4), repeats),
    ]
  )
  return [[what, a, b, b / a] for what, a, b in out]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", type=int, default=1024, help="output units of the layer")
  parser.add_argument("--width", type=int, default=4096, help="inputs of the layer")
  parser.add_argument("--sequences", type=int, default=128, help="calibration sequences")
  parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
  parser.add_argument("--repeats", type=int, default=3, help="timings per median")
  parser.add_argument("--no_doc", action="store_true", help="print only")
  args = parser.parse_args(argv)
  load = report.load_average()
  table = run(args.rows, args.width, args.sequences, args.tokens, repeats=args.repeats)
  body = report.markdown_table(
    ["step", "sparsejax s", "NumPy port of the reference s", "ratio (port / sparsejax)"],
    [[what, f"{a:.3f}", f"{b:.3f}", f"{r:.2f}"] for what, a, b, r in table],
  )
  text = (
    "## Calibration pruning on one layer (`python -m benchmarks.calibration`)\n\n"
    f"{report.stamp()}; load average {load} at the start. W [{args.rows}, {args.width}], "
    f"{args.sequences} x {args.tokens} calibration tokens; seconds per layer (medians of "
    f"{args.repeats} after compilation; the captures and the SparseGPT port timed once). "
    "Baselines: NumPy ports of the reference algorithms (IST-DASLab/sparsegpt "
    "`add_batch`/`fasterprune`, locuslab/wanda `add_batch`/`prune_wanda`), "
    "benchmarks/calibration.py. Targets: SparseGPT <= 3 s, Wanda well under 1 s.\n\n" + body
  )
  print(text)
  if not args.no_doc:
    report.update_section("calibration", text)


if __name__ == "__main__":
  main()
