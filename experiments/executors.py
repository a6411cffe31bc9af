"""Where a sweep's grid point runs on this machine: in this process, or in a child
process running experiments.prune_train on the point's command line.
experiments.ray_executor runs the same function in Ray workers.

Each executor has ``run(point, shared, out_dir, source) -> (exit code, where its log
is)``; those that run points elsewhere also ``running()`` and ``stop()`` (for
:func:`experiments.processes.stop_on_signals`). The sweep (experiments.sweep) picks one
and hands it the points; nothing here imports the sweep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from absl import logging

from experiments import datasource, grid, plugins, processes, prune_train, run_config


def run_in_process(
  config: ml_collections.ConfigDict, out_dir: str, source: datasource.DataSource
) -> int:
  """One run in this process (data and compiled steps are reused across runs); returns
  0 on success, 1 on failure (logged, the sweep goes on)."""
  try:
    prune_train.run(config, out_dir=out_dir, source=source)
  except Exception:  # pylint: disable=broad-except
    logging.exception("Run failed: %s", run_config.run_name(config))
    return 1
  return 0


def run_point(
  point: dict,
  shared: list[str],
  out_dir: str,
  source: datasource.DataSource,
  imports: Sequence[str] = (),
) -> int:
  """A grid point in this process, after importing ``imports`` (once per process): 0
  on success, 1 on failure (logged). What a Ray task runs."""
  plugins.import_modules(imports)
  return run_in_process(grid.config_for(point, shared), out_dir, source)


class InProcess:
  """Runs the points one after another in this process (``--jobs=1``)."""

  def run(
    self, point: dict, shared: list[str], out_dir: str, source: datasource.DataSource
  ) -> tuple[int, str]:
    return run_point(point, shared, out_dir, source), "see this process's log"


class ChildProcesses:
  """Runs each point as a child process (``python -m experiments.prune_train``, its
  output in ``<run dir>/log.txt``), each in its own process group; :meth:`stop` ends
  them (experiments.processes)."""

  def __init__(self, compilation_cache_dir: str | None = None, imports: Sequence[str] = ()):
    """``compilation_cache_dir``: the children's persistent compilation cache ('':
    none; None: their default); ``imports``: what they ``--import``."""
    self._cache = compilation_cache_dir
    self._imports = list(imports)
    self._children = processes.Children()

  def run(
    self, point: dict, shared: list[str], out_dir: str, source: datasource.DataSource
  ) -> tuple[int, str]:
    log = grid.result_path(grid.config_for(point, shared), out_dir).replace(
      "result.json", "log.txt"
    )
    os.makedirs(os.path.dirname(log), exist_ok=True)
    cmd = grid.command(point, shared, out_dir, source, self._cache, self._imports)
    with open(log, "a") as f:
      code = self._children.run(cmd, f)
    return code, f"see {log}"

  def running(self) -> int:
    return self._children.running()

  def pids(self) -> list[int]:
    return self._children.pids()

  def stop(self) -> None:
    self._children.stop()
