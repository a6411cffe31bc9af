"""The docs/benchmarks.md writer and machine stamp shared by the benchmark scripts (their
timings: sparsejax.timing)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import jax

from experiments import results
from sparsejax import timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")


# The one timing helper (sparsejax.timing), under the name the benchmarks use.
median_seconds = timing.median_seconds


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return (
    f"{os.cpu_count()} cores ({cpu}); JAX {jax.__version__} on {jax.default_backend()} ({devices})"
  )


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, e.g. '0.25 0.81 0.98' ('?' where unknown)."""
  try:
    with open("/proc/loadavg") as f:
      return " ".join(f.read().split()[:3])
  except OSError:
    return "?"


def stamp() -> str:
  return f"{datetime.date.today().isoformat()}, {machine()}"


def markdown_table(header: list[str], rows: list[list]) -> str:
  return results.markdown_table(header, rows)


def update_section(name: str, body: str, path: str = DOC) -> None:
  """Replaces the section between ``<!-- name:start -->`` and ``<!-- name:end -->``
  of docs/benchmarks.md (appending it if absent), leaving the others untouched."""
  results.update_markdown_section(path, name, body, title="# Benchmarks\n")


def export_commit(commit: str, folder: str, paths: tuple[str, ...]) -> str:
  """``folder`` holding ``paths`` of this repository as of ``commit`` (git archive), for
  timing a baseline beside this checkout in the same run."""
  os.makedirs(folder, exist_ok=True)
  archive = subprocess.run(
    ["git", "-C", ROOT, "archive", commit, *paths], check=True, capture_output=True
  ).stdout
  subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
  return folder
