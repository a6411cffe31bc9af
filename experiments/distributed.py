r"""Several processes (hosts) training one run: ``jax.distributed`` from flags or the
environment.

  # process i of N (one per host; every host the same command but --process_id):
  python -m experiments.prune_train --config=... --out_dir=/shared/runs \
      --coordinator_address=HOST0:1234 --num_processes=N --process_id=i

Each setting comes from its flag, else from ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. ``--coordinator_address=auto`` lets JAX
find all three in a SLURM or Open MPI job (``jax.distributed.initialize()`` without
arguments); it is not assumed from the job's variables alone, because a sweep's
single-process runs inherit them too. Nothing set: one process.
On the CPU, cross-process collectives use gloo
(``jax_cpu_collectives_implementation``). Once initialized, ``jax.devices()``
holds every process's devices, and :func:`sparsejax.training.train` builds its
mesh over them (docs/cluster.md).
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

from experiments import checks

ENV = {
  "coordinator_address": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}


def define_flags() -> None:
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "Multi-host training: 'host:port' of "
    "process 0's coordinator, the same in every process (default "
    f"${ENV['coordinator_address']}); 'auto': JAX finds it and the "
    "process count and index in a SLURM or Open MPI job.",
  )
  flags.DEFINE_integer(
    "num_processes",
    None,
    f"Multi-host training: number of processes (default ${ENV['num_processes']}).",
  )
  flags.DEFINE_integer(
    "process_id",
    None,
    "Multi-host training: this process's index in "
    f"[0, num_processes) (default ${ENV['process_id']}).",
  )


def _int(name: str, flag_value, environ) -> int | None:
  if flag_value is not None:
    return flag_value
  value = environ.get(ENV[name])
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise checks.FlagError(f"${ENV[name]}={value!r} must be an integer (--{name}).") from None


def settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ=None,
) -> dict | None:
  """The ``jax.distributed.initialize`` arguments from flag values (None: not given)
  and the environment; for the address 'auto', those given (JAX detects the rest in a
  SLURM/Open MPI job); None: one process.

  Raises:
    experiments.checks.FlagError: an incomplete or inconsistent setting, named as its
      flag.
  """
  environ = os.environ if environ is None else environ
  address = coordinator_address or environ.get(ENV["coordinator_address"]) or None
  num = _int("num_processes", num_processes, environ)
  pid = _int("process_id", process_id, environ)
  if address is None:
    if num is None and pid is None:
      return None
    if num == 1 and pid in (None, 0):
      return None
    raise checks.FlagError(
      f"--num_processes={num!r} --process_id={pid!r} need "
      "--coordinator_address=host:port (process 0's host and a free port; or "
      f"${ENV['coordinator_address']})."
    )
  if address == "auto":
    return {k: v for k, v in (("num_processes", num), ("process_id", pid)) if v is not None}
  if num is None or pid is None:
    raise checks.FlagError(
      f"--coordinator_address={address!r} needs --num_processes and "
      f"--process_id (or ${ENV['num_processes']}, ${ENV['process_id']})."
    )
  if num < 1:
    raise checks.FlagError(f"--num_processes={num!r} must be an integer >= 1.")
  if not 0 <= pid < num:
    raise checks.FlagError(f"--process_id={pid!r} must be in [0, {num}) (--num_processes={num}).")
  if ":" not in address:
    raise checks.FlagError(f"--coordinator_address={address!r} must be 'host:port'.")
  return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def initialize(kwargs: dict | None) -> None:
  """``jax.distributed.initialize(**kwargs)`` (gloo collectives on the CPU); nothing
  for None. Call before any JAX computation."""
  if kwargs is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info(
    "Process %d of %d; %d local of %d devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def initialize_from_flags() -> None:
  """:func:`initialize` with the flags of :func:`define_flags` and the environment."""
  f = flags.FLAGS
  initialize(settings(f.coordinator_address, f.num_processes, f.process_id))


def is_primary() -> bool:
  """This process writes the run's files (result, masks, wall time): process 0."""
  return jax.process_index() == 0
