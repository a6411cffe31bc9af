r"""The sweep's grid points as Ray tasks (``experiments.sweep --executor=ray``).

  ray start --head --port=6379            # on the head node (or none: a local instance)
  python -m experiments.sweep ... --executor=ray --ray_address=HEAD:6379 \
      --ray_cpus_per_run=2 --ray_gpus_per_run=0.5 --out_dir=/shared/sweep

One grid point is one Ray task that declares ``--ray_cpus_per_run`` CPUs and
``--ray_gpus_per_run`` GPUs and calls the function the local executor calls
(:func:`experiments.executors.run_point` -> :func:`experiments.prune_train.run`) in a
Ray worker process. So the run folder's lock (experiments.rundir), the result's
validation (experiments.results) and resuming from Orbax checkpoints are the local
sweep's: only where the call runs changes. A worker that dies (killed, out of
memory, node lost) releases its run folder's lock with its process; Ray runs the
point again (up to ``--ray_max_retries`` times) and the new attempt resumes from
the last checkpoint. Results are written atomically by the run itself, so a point
is either finished (valid result.json) or not (no result.json).

Workers import ``sparsejax`` and ``experiments`` from this repository's folder
(``PYTHONPATH``), so every node needs the repository (and its dependencies) at the
same path, and ``--out_dir`` must be a folder every node sees (a shared file system).
A task with no GPU runs JAX on the CPU (``JAX_PLATFORMS=cpu``); tasks sharing a GPU
(``--ray_gpus_per_run`` < 1) allocate GPU memory as they need it
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``). Ray runs a GPU task in a fresh worker
(``max_calls=1`` is Ray's default for GPU tasks), CPU tasks reuse theirs (data and
compiled steps stay cached across runs). Workers use the persistent compilation cache
of ``--compilation_cache_dir`` as the local executor's children do (each node's
default folder unless the flag names one; ``--nocompilation_cache``: none).

Without ``--ray_address`` the sweep starts a local instance (experiments.ray_local):
listening on 127.0.0.1 only, with a token of its own, ended with the sweep's process
however that ends (SIGKILL included).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
from collections.abc import Sequence

from absl import logging

from experiments import checks, compilation_cache, datasource, executors, plugins, ray_local

INSTALL = "pip install 'sparsejax[ray]' (or: pip install 'ray[default]>=2.9')"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class RayOptions:
  """Where and how the grid's tasks run.

  Attributes:
    address: a running cluster's address ('host:port' of its head, 'auto', or
      'ray://host:port' for Ray Client); None starts a local instance.
    cpus_per_run: CPUs each task declares (> 0).
    gpus_per_run: GPUs each task declares (>= 0; fractions share a GPU).
    max_retries: times a point is run again after its worker died (>= 0).
  """

  address: str | None = None
  cpus_per_run: float = 1.0
  gpus_per_run: float = 0.0
  max_retries: int = 3

  def check(self) -> None:
    """ValueError naming the flag of the first bad field."""
    for name, value, low, strict in (
      ("ray_cpus_per_run", self.cpus_per_run, 0.0, True),
      ("ray_gpus_per_run", self.gpus_per_run, 0.0, False),
    ):
      if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (value > low if strict else value >= low)
      ):
        raise ValueError(f"--{name}={value!r} must be a number {'>' if strict else '>='} {low:g}.")
    checks.check_int_flag("ray_max_retries", self.max_retries, low=0)


def import_ray():
  """The ``ray`` module, or ValueError saying what to install."""
  try:
    import ray  # the optional extra, imported only for --executor=ray
  except ImportError as err:
    raise ValueError(
      f"--executor=ray needs the ray package, which is not installed "
      f"({err}); install it with {INSTALL}, or use --executor=local."
    ) from None
  return ray


def _host_port(address: str) -> tuple[str, int] | None:
  """(host, port) of 'host:port' or 'ray://host:port'; None for 'auto'."""
  if address == "auto":
    return None
  rest = address[len("ray://") :] if address.startswith("ray://") else address
  host, sep, port = rest.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(
      f"--ray_address={address!r} must be 'host:port' (the head node's "
      "GCS address that `ray start --head` prints), 'ray://host:port', "
      "'auto', or empty for a local Ray instance."
    )
  return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
  """ValueError naming ``--ray_address`` unless a TCP connection to it opens within
  ``timeout`` seconds (``ray.init`` itself retries for minutes)."""
  target = _host_port(address)
  if target is None:
    return
  try:
    with socket.create_connection(target, timeout=timeout):
      pass
  except OSError as err:
    raise ValueError(
      f"--ray_address={address!r} is not reachable ({err.strerror or err}): start the "
      f"head node there (`ray start --head --port={target[1]}`), give the address "
      "`ray status` shows on the cluster, or leave --ray_address empty for a local Ray "
      "instance."
    ) from None


def connect(options: RayOptions):
  """Connects this process to the cluster (or starts a local instance,
  :func:`experiments.ray_local.start`; a connection this process already has is kept);
  returns the ray module.

  Raises:
    ValueError: ray is not installed, or the cluster cannot be reached (naming the
      flag and what to install or start).
    RuntimeError: the local instance did not start (naming its log).
  """
  options.check()
  ray = import_ray()
  if options.address:
    check_reachable(options.address)
  if ray.is_initialized():
    return ray
  if not options.address:
    _start_local(ray)
  else:
    try:
      ray.init(address=options.address)
    except ConnectionError as err:
      raise ValueError(
        f"--ray_address={options.address!r}: no Ray cluster answers there "
        f"({err}); start one with `ray start --head`, or leave "
        "--ray_address empty for a local instance."
      ) from None
  logging.info("Ray cluster: %s", ray.cluster_resources())
  if not fits_a_node(ray, options):
    logging.warning(
      "No node of the Ray cluster has --ray_cpus_per_run=%g CPUs and "
      "--ray_gpus_per_run=%g GPUs: the runs wait until "
      "such a node joins (an autoscaler may add one); lower the flags "
      "otherwise.",
      options.cpus_per_run,
      options.gpus_per_run,
    )
  return ray


def _start_local(ray) -> None:
  """Connects this process to the local instance it started (experiments.ray_local),
  starting one first if it has none running."""
  ray_local.prepare_driver(ray)
  instance = ray_local.current()
  if instance is None or instance.watchdog.poll() is not None:
    instance = ray_local.start()
  logging.info(
    "Local Ray instance at %s (listening on %s only; ends with this process); its logs: %s",
    instance.address,
    ray_local.LOOPBACK,
    instance.logs(),
  )
  ray.init(address=instance.address)


def fits_a_node(ray, options: RayOptions) -> bool:
  """A live node of the cluster has the CPUs and GPUs one run declares."""
  return any(
    n.get("Alive")
    and n["Resources"].get("CPU", 0) >= options.cpus_per_run
    and n["Resources"].get("GPU", 0) >= options.gpus_per_run
    for n in ray.nodes()
  )


def capacity(ray, options: RayOptions) -> int:
  """Runs the cluster holds at once now: its CPUs (and GPUs) over each run's share."""
  resources = ray.cluster_resources()
  slots = int(resources.get("CPU", 0) // options.cpus_per_run)
  if options.gpus_per_run > 0:
    slots = min(slots, int(resources.get("GPU", 0) // options.gpus_per_run))
  return max(1, slots)


def _logs(options: RayOptions) -> str:
  """Where the Ray logs of the points' workers are."""
  instance = ray_local.current()
  if options.address or instance is None:
    return "/tmp/ray/session_latest/logs on the node"
  return instance.logs()


def _env(options: RayOptions) -> dict:
  path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
  env = {"PYTHONPATH": path}
  if options.gpus_per_run == 0:
    env["JAX_PLATFORMS"] = "cpu"
  elif options.gpus_per_run < 1:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def enable_worker_cache(directory: str | None) -> str | None:
  """The persistent compilation cache in a Ray worker, as a local child process of
  the sweep would use it: ``directory`` ('': none; None: this node's default,
  :func:`experiments.compilation_cache.default_dir`). A node that cannot
  write it runs without the cache (a warning), not without the run."""
  if directory is None:
    directory = compilation_cache.default_dir()
  try:
    return compilation_cache.enable(directory)
  except ValueError as err:
    logging.warning("%s This worker runs without the persistent compilation cache.", err)
    return None


def _run_task(
  point: dict,
  shared: list,
  out_dir: str,
  source: datasource.DataSource,
  compilation_cache_dir: str | None = None,
  imports: Sequence[str] = (),
) -> int:
  """The body of a grid point's Ray task (in a Ray worker): the local executor's run,
  after the sweep's ``--import`` modules (once per worker)."""
  enable_worker_cache(compilation_cache_dir)
  return executors.run_point(point, shared, out_dir, source, imports)


class RayRuns:
  """Submits grid points as Ray tasks and waits for them (one call per thread); on
  :meth:`stop`, cancels those in flight (their workers end; the runs resume from
  their checkpoints next time) and starts no new one."""

  def __init__(
    self,
    ray,
    options: RayOptions,
    compilation_cache_dir: str | None = None,
    imports: Sequence[str] = (),
  ):
    """``compilation_cache_dir``: the workers' persistent compilation cache ('': none;
    None: each node's default), a folder every node can write (a shared one lets
    nodes share compiled programs); ``imports``: the modules every task imports first
    (``--import``; module names must be importable in the workers, on ``PYTHONPATH``,
    paths must exist on every node)."""
    self._ray = ray
    self._options = options
    self._cache = compilation_cache_dir
    self._imports = plugins.normalized(imports)
    self._task = ray.remote(_run_task).options(
      num_cpus=options.cpus_per_run,
      num_gpus=options.gpus_per_run,
      max_retries=options.max_retries,
      retry_exceptions=False,
      runtime_env={"env_vars": _env(options)},
    )
    self._refs: set = set()
    self._lock = threading.Lock()
    self.stopping = False

  def run(
    self, point: dict, shared: list, out_dir: str, source: datasource.DataSource
  ) -> tuple[int, str]:
    """Runs ``point`` as a task to its end: (0, '') when it finished, else (1, why)."""
    ray = self._ray
    with self._lock:
      if self.stopping:
        return 1, "not started: the sweep was stopped"
      ref = self._task.remote(point, shared, out_dir, source, self._cache, self._imports)
      self._refs.add(ref)
    try:
      code = ray.get(ref)
    except ray.exceptions.TaskCancelledError:
      return 1, "cancelled: the sweep was stopped; it resumes from its checkpoint"
    except (
      ray.exceptions.WorkerCrashedError,
      ray.exceptions.NodeDiedError,
      ray.exceptions.OutOfMemoryError,
    ) as err:
      tries = self._options.max_retries + 1
      return 1, (
        f"its Ray worker died in each of {tries} attempt(s) "
        f"(--ray_max_retries={self._options.max_retries}): {type(err).__name__}; "
        f"see the Ray logs ({_logs(self._options)}). It resumes "
        "from its last checkpoint when the sweep runs again"
      )
    except ray.exceptions.RayError as err:
      return 1, f"Ray could not run it: {type(err).__name__}: {str(err)[:500]}"
    finally:
      with self._lock:
        self._refs.discard(ref)
    if code:
      return code, "the traceback is in the Ray worker's log (forwarded to this output)"
    return 0, ""

  def running(self) -> int:
    with self._lock:
      return len(self._refs)

  def stop(self) -> None:
    with self._lock:
      self.stopping = True
      refs = list(self._refs)
    for ref in refs:
      self._ray.cancel(ref, force=True)
