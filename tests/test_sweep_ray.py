"""experiments.sweep --executor=ray on a local Ray instance (127.0.0.1, one CPU), on
synthetic data: runs, skips, retries a killed worker's run, reports a run whose
worker keeps dying; bad flags fail before any file is written."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from experiments import (
  compilation_cache,
  datasource,
  grid,
  ray_executor,
  ray_local,
  results,
  rundir,
  sweep,
)
from sparsejax import files

pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")

SOURCE = datasource.DataSource(synthetic=True)
# Small steps, many of them: a few seconds to kill its worker between checkpoints.
SHARED = grid.shared_overrides(
  2000, 1000, "--config.checkpoint_every=100 --config.log_every=1000 --config.batch_size=10"
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address():
  """A one-CPU Ray head on 127.0.0.1 started for these tests (ended by its pid)."""
  ray = pytest.importorskip("ray")
  port = _free_port()
  temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Short: socket paths are limited.
  cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
  # A throw-away cluster on the loopback address: no token to share with the driver.
  previous = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", ray_local.CLUSTER_ENV)}
  os.environ["RAY_AUTH_MODE"] = "disabled"
  # Ray's cluster mode off, in the head and in this driver: only then does Ray keep
  # 127.0.0.1 as the node's address and listen there alone (experiments.ray_local).
  ray_local.prepare_driver(ray)
  head = subprocess.Popen(
    [
      cli,
      "start",
      "--head",
      "--block",
      "--node-ip-address=127.0.0.1",
      f"--port={port}",
      f"--ray-client-server-port={_free_port()}",
      "--num-cpus=1",
      "--num-gpus=0",
      "--include-dashboard=false",
      f"--temp-dir={temp}",
      "--disable-usage-stats",
    ],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  address = f"127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while True:
      try:
        ray_executor.check_reachable(address, timeout=1.0)
        break
      except ValueError:
        if head.poll() is not None or time.monotonic() > deadline:
          raise
        time.sleep(0.3)
    yield address
  finally:
    ray.shutdown()
    head.send_signal(signal.SIGTERM)
    try:
      head.wait(timeout=60)
    except subprocess.TimeoutExpired:
      os.killpg(head.pid, signal.SIGKILL)
      head.wait()
    shutil.rmtree(temp, ignore_errors=True)
    for name, value in previous.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def _path(point, out_dir):
  return grid.result_path(grid.config_for(point, SHARED), str(out_dir))


def _kill_worker(point, out_dir, after_checkpoint: bool, timeout=240.0) -> None:
  """SIGKILLs the process holding ``point``'s run folder lock (its Ray worker) as soon
  as it holds it, or once it has saved its first checkpoint (step 100), while its
  result is not written yet."""
  run_dir = os.path.dirname(_path(point, out_dir))
  lock, first = os.path.join(run_dir, ".lock"), os.path.join(run_dir, "checkpoints", "100")
  deadline = time.monotonic() + timeout
  while not (
    os.path.isdir(first) if after_checkpoint else os.path.exists(lock) and os.path.getsize(lock)
  ):
    assert time.monotonic() < deadline, "the run did not get there in time"
    time.sleep(0.02)
  with open(lock) as f:
    pid = int(f.read().split()[1])
  assert not os.path.exists(_path(point, out_dir)), "finished before it could be killed"
  os.kill(pid, signal.SIGKILL)


def _execute_in_thread(points, out_dir, options, cache_dir=None):
  out = {}

  def target():
    try:
      out["counts"] = sweep.execute(
        points, SHARED, str(out_dir), SOURCE, None, "ray", options, cache_dir
      )
    except BaseException as err:  # pylint: disable=broad-except
      out["error"] = err

  thread = threading.Thread(target=target)
  thread.start()
  return thread, out


def _no_stray_files(out_dir):
  for root, _, names in os.walk(out_dir):
    for f in names:
      assert not f.startswith(files.TMP_PREFIX) and ".invalid-" not in f, os.path.join(root, f)


@pytest.mark.slow
def test_ray_sweep_retries_a_killed_worker_and_reports_one_that_keeps_dying(ray_address, tmp_path):
  points = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct", "effective"], [0])
  options = ray_executor.RayOptions(address=ray_address, cpus_per_run=1, max_retries=2)
  cache = tempfile.mkdtemp(prefix="jaxcache")
  try:
    thread, out = _execute_in_thread(points, tmp_path, options, cache)
    _kill_worker(points[0], tmp_path, after_checkpoint=True)
    thread.join(timeout=600)
    # The workers compiled into the sweep's persistent compilation cache.
    assert os.listdir(cache)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  assert "error" not in out, out.get("error")
  assert out["counts"] == (2, 0, 0)  # the killed run was retried, not failed
  for point in points:
    r = results.load(_path(point, tmp_path))
    assert r["status"] == "ok" and [h["step"] for h in r["history"]] == [1000, 2000]
  first = results.load(_path(points[0], tmp_path))
  # Two processes worked on it: the killed worker and the retry, which resumed.
  assert first["processes"] == 2
  assert sorted(os.listdir(tmp_path)) == sorted(
    os.path.basename(os.path.dirname(_path(p, tmp_path))) for p in points
  )
  _no_stray_files(tmp_path)
  # Nothing runs twice: both are done.
  assert sweep.execute(points, SHARED, str(tmp_path), SOURCE, None, "ray", options) == (0, 2, 0)

  # A worker that dies at every attempt (here: no retries): the run fails, naming the
  # flag, and leaves no result (the next sweep runs it again).
  again = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct"], [1])
  no_retry = ray_executor.RayOptions(address=ray_address, max_retries=0)
  runner = ray_executor.RayRuns(ray_executor.connect(no_retry), no_retry)
  outcome = {}
  thread = threading.Thread(
    target=lambda: outcome.update(r=runner.run(again[0], SHARED, str(tmp_path), SOURCE))
  )
  thread.start()
  _kill_worker(again[0], tmp_path, after_checkpoint=False)
  thread.join(timeout=600)
  code, why = outcome["r"]
  assert code == 1 and "--ray_max_retries=0" in why and "WorkerCrashedError" in why
  assert not os.path.exists(_path(again[0], tmp_path))
  # The killed worker may have died inside an atomic write (its wall-clock file): the
  # run folder's next holder removes that temp file.
  with rundir.locked(os.path.dirname(_path(again[0], tmp_path))):
    _no_stray_files(tmp_path)


def test_worker_cache_as_the_local_children_use_it(tmp_path, monkeypatch):
  """A worker's cache: the folder given, each node's default for None, none for '';
  a folder the node cannot create: a warning and no cache, not a failed run."""
  import jax  # pylint: disable=import-outside-toplevel

  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  try:
    assert ray_executor.enable_worker_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert ray_executor.enable_worker_cache(None) == compilation_cache.default_dir()
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xdg" / "sparsejax" / "jax")
    assert ray_executor.enable_worker_cache("") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    current = jax.config.jax_compilation_cache_dir
    assert ray_executor.enable_worker_cache(str(blocker / "cache")) is None
    assert jax.config.jax_compilation_cache_dir == current
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_bad_ray_flags_fail_by_name_before_any_file(tmp_path, monkeypatch):
  points = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct"], [0])
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="--executor='spark' is not an executor"):
    sweep.execute(points, SHARED, str(out), SOURCE, None, "spark")
  for fields, message in (
    (dict(cpus_per_run=0), "--ray_cpus_per_run=0 must be a number > 0"),
    (dict(gpus_per_run=-1), "--ray_gpus_per_run=-1 must be a number >= 0"),
    (dict(max_retries=-1), "--ray_max_retries=-1 must be an integer >= 0"),
  ):
    with pytest.raises(ValueError, match=message):
      sweep.execute(
        points, SHARED, str(out), SOURCE, None, "ray", ray_executor.RayOptions(**fields)
      )
  monkeypatch.setitem(sys.modules, "ray", None)  # As if not installed.
  with pytest.raises(ValueError, match=r"--executor=ray needs the ray package.*pip install"):
    sweep.execute(points, SHARED, str(out), SOURCE, None, "ray")
  assert not out.exists() or os.listdir(out) == []


def test_unreachable_ray_address_fails_by_name_before_any_file(tmp_path):
  pytest.importorskip("ray")
  points = grid.grid(["lenet300100"], ["random/uniform"], [10.0], ["direct"], [0])
  out = tmp_path / "out"
  port = _free_port()  # Nothing listens there once the probe socket is closed.
  for address, message in (
    (
      f"127.0.0.1:{port}",
      rf"--ray_address='127.0.0.1:{port}' is not reachable.*ray start --head --port={port}",
    ),
    ("nowhere", "--ray_address='nowhere' must be 'host:port'"),
  ):
    with pytest.raises(ValueError, match=message):
      sweep.execute(
        points, SHARED, str(out), SOURCE, None, "ray", ray_executor.RayOptions(address=address)
      )
  assert not out.exists() or os.listdir(out) == []


def test_ray_addresses_and_capacity():
  assert ray_executor._host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
  assert ray_executor._host_port("ray://head:10001") == ("head", 10001)
  assert ray_executor._host_port("[::1]:6379") == ("::1", 6379)
  assert ray_executor._host_port("auto") is None

  class Cluster:  # What capacity reads of a cluster: 10 CPUs, 2 GPUs.
    @staticmethod
    def cluster_resources():
      return {"CPU": 10.0, "GPU": 2.0}

    @staticmethod
    def nodes():
      return [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
      ]

  slots = lambda **kw: ray_executor.capacity(Cluster, ray_executor.RayOptions(**kw))
  assert slots(cpus_per_run=3) == 3
  assert slots(cpus_per_run=1, gpus_per_run=0.5) == 4
  assert slots(cpus_per_run=1, gpus_per_run=4) == 1  # at least one in flight
  fits = lambda **kw: ray_executor.fits_a_node(Cluster, ray_executor.RayOptions(**kw))
  assert fits(cpus_per_run=8, gpus_per_run=1) and fits(cpus_per_run=2, gpus_per_run=0.5)
  assert not fits(cpus_per_run=9) and not fits(cpus_per_run=1, gpus_per_run=2)
