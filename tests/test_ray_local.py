"""The local Ray instance of ``experiments.sweep --executor=ray`` (no --ray_address):
every socket its processes listen on is on the loopback interface, and it ends with
the sweep that started it, even when the sweep is killed with SIGKILL."""

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from experiments import ray_local

pytestmark = pytest.mark.usefixtures("one_ray_at_a_time")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A driver as a notebook or a plugin could have it: ray imported before the sweep
# connects (the sweep binary itself imports ray only then, see the next test).
DRIVER = """
import os, sys
import ray
from experiments import ray_executor
ray = ray_executor.connect(ray_executor.RayOptions())
task = ray.remote(lambda: os.getpid()).options(runtime_env={"env_vars": {"X": "1"}})
print(ray.get(task.remote()), flush=True)
sys.stdin.read()  # until the test closes it: then a normal exit
"""


def _env() -> dict:
  """This environment without settings that would point Ray elsewhere."""
  return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}


def _tree(pid: int) -> dict[int, tuple[str, float]]:
  """``pid`` and its descendants now: {pid: (name, start time)}."""
  root = psutil.Process(pid)
  out = {}
  for p in [root, *root.children(recursive=True)]:
    try:
      out[p.pid] = (p.name(), p.create_time())
    except psutil.NoSuchProcess:
      pass
  return out


def _alive(recorded: dict[int, tuple[str, float]]) -> dict[int, str]:
  """The recorded processes still running (the same process, not a reused pid)."""
  out = {}
  for pid, (name, started) in recorded.items():
    try:
      p = psutil.Process(pid)
      if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
        out[pid] = name
    except psutil.NoSuchProcess:
      pass
  return out


def _temp_dirs(pids) -> list[str]:
  """The Ray folders of the local instances among ``pids`` (their watchdogs' argument)."""
  out = []
  for pid in pids:
    try:
      cmdline = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
      continue
    if "experiments.ray_local" in cmdline:
      out += [a for a in cmdline if os.path.basename(a).startswith("sparsejax-ray-")]
  return out


def _kill(recorded: dict[int, tuple[str, float]]) -> None:
  for pid in _alive(recorded):
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _loopback(ip: str) -> bool:
  address = ipaddress.ip_address(ip.split("%")[0])
  mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on an IPv6 socket
  return (mapped or address).is_loopback


def _listeners(pids) -> list[tuple[str, int, int]]:
  """(address, port, pid) of every listening TCP socket of ``pids``."""
  return [
    (c.laddr.ip, c.laddr.port, c.pid)
    for c in psutil.net_connections(kind="inet")
    if c.status == psutil.CONN_LISTEN and c.pid in pids
  ]


@pytest.mark.slow
def test_local_instance_listens_on_loopback_only_and_ends_with_its_driver(tmp_path):
  pytest.importorskip("ray")
  log = tmp_path / "driver.log"
  with open(log, "w") as stderr:
    driver = subprocess.Popen(
      [sys.executable, "-c", DRIVER],
      cwd=REPO,
      env=_env(),
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=stderr,
      text=True,
    )
  seen: dict[int, tuple[str, float]] = {}
  temp_dirs: list[str] = []
  try:
    line = driver.stdout.readline()  # once a task ran: a worker is up too
    assert line, f"the driver ended: {log.read_text()[-3000:]}"
    worker = int(line)
    listeners = set()
    for _ in range(10):  # a few seconds: agents and workers open theirs as they start
      seen.update(_tree(driver.pid))
      listeners |= {(ip, port, seen[pid][0], pid) for ip, port, pid in _listeners(seen)}
      time.sleep(0.5)
    temp_dirs = _temp_dirs(seen)
    exposed = sorted(x for x in listeners if not _loopback(x[0]))
    assert not exposed, f"listening beyond this machine: {exposed}"
    # The check saw the instance: the driver, its GCS, raylet and the task's worker listen.
    names = {name for _, _, name, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners
    assert {driver.pid, worker} <= {pid for *_, pid in listeners}, listeners
    driver.stdin.close()  # the driver ends normally: the instance ends with it
    assert driver.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while _alive(seen) and time.monotonic() < deadline:
      time.sleep(0.5)
    assert not _alive(seen), f"outlived its driver by 30 s: {_alive(seen)}"
  finally:
    if driver.poll() is None:
      driver.kill()
      driver.wait()
    _kill(seen)
    for folder in temp_dirs:
      shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_local_instance_ends_with_a_sweep_killed_by_sigkill(tmp_path):
  pytest.importorskip("ray")
  out = tmp_path / "out"
  cmd = [
    sys.executable,
    "-m",
    "experiments.sweep",
    "--executor=ray",
    "--archs=lenet300100",
    "--pruners=random/uniform",
    "--compressions=10",
    "--pruning_types=direct",
    "--seeds=0",
    "--train_steps=100000",
    "--synthetic_data",
    f"--compilation_cache_dir={tmp_path / 'cache'}",
    f"--out_dir={out}",
  ]
  log = tmp_path / "sweep.log"
  with open(log, "w") as output:
    sweep = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=output, stderr=subprocess.STDOUT)
  recorded: dict[int, tuple[str, float]] = {}
  temp_dirs: list[str] = []
  try:
    # A Ray worker runs the point once it holds the run folder's lock (its pid written).
    deadline = time.monotonic() + 300
    while not [f for f in out.glob("*/.lock") if f.stat().st_size]:
      assert sweep.poll() is None, f"the sweep ended: {log.read_text()[-3000:]}"
      assert time.monotonic() < deadline, f"the run did not start: {log.read_text()[-3000:]}"
      time.sleep(0.2)
    time.sleep(2)  # agents and workers all up
    recorded = _tree(sweep.pid)
    temp_dirs = _temp_dirs(recorded)
    names = {name for name, _ in recorded.values()}
    assert {"gcs_server", "raylet"} <= names, names  # the instance is recorded
    worker = int(next(out.glob("*/.lock")).read_text().split()[1])
    assert worker in recorded, (worker, recorded)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    deadline = time.monotonic() + 30
    while _alive(recorded) and time.monotonic() < deadline:
      time.sleep(0.5)
    assert not _alive(recorded), f"outlived the sweep by 30 s: {_alive(recorded)}"
  finally:
    if sweep.poll() is None:
      sweep.kill()
      sweep.wait()
    _kill(recorded)
    for folder in temp_dirs:
      shutil.rmtree(folder, ignore_errors=True)


def test_local_instance_token_follows_the_ray_auth_settings(monkeypatch):
  """A token of its own per instance, unless RAY_AUTH_* say what to use."""
  for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
    monkeypatch.delenv(name, raising=False)
  first, second = ray_local._auth_env(), ray_local._auth_env()
  assert first["RAY_AUTH_MODE"] == "token" and len(first["RAY_AUTH_TOKEN"]) == 64
  assert first["RAY_AUTH_TOKEN"] != second["RAY_AUTH_TOKEN"]
  monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/somewhere/token")
  assert ray_local._auth_env() == {"RAY_AUTH_MODE": "token"}  # the user's token file
  for mode in ("disabled", "token"):
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    assert ray_local._auth_env() == {}  # as the user set it
