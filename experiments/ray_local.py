r"""The local Ray instance of ``experiments.sweep --executor=ray`` (no ``--ray_address``):
it listens on 127.0.0.1 only and ends with the process that started it, however that
process ends (SIGKILL included).

Plain ``ray.init()`` does neither (Ray 2.60, Linux): its GCS, raylet, object manager,
workers, driver and autoscaler metrics listen on every interface, its runtime-env agent
on the host's outward address, and after a driver killed with SIGKILL its dashboard and
runtime-env agents live on for a minute (they are the raylet's children; only the
driver's own children die with it).

:func:`start` starts a *watchdog*: this module run as a program, in its own session,

- which is the child subreaper of everything it starts (Linux's
  ``PR_SET_CHILD_SUBREAPER``): the instance's processes are its descendants, and the
  ones Ray orphans are re-parented to it instead of to init;
- which starts the instance itself (``ray.init``, no dashboard) with Ray's cluster mode
  off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the mode Ray uses on macOS and
  Windows): the node's address is then 127.0.0.1, and Ray binds its gRPC servers (GCS,
  raylet, object manager, workers, drivers), its runtime-env agent and the autoscaler's
  metrics to the loopback interface. Only that exact address does it: Ray replaces a
  loopback ``_node_ip_address`` / ``ray start --node-ip-address=127.0.0.1`` by the
  host's outward address (``resolve_ip_for_localhost``) and then listens on all of them;
- with token authentication (Ray >= 2.52) unless ``RAY_AUTH_MODE`` is set: a fresh
  random token per instance, handed over in the environment (no ``~/.ray/auth_token``
  written), so other users of this machine cannot use the loopback ports either;
- which then waits for end of file on a pipe whose only write end the starting process
  holds. The kernel closes it when that process ends for any reason, so no code needs
  to run there. The watchdog then sends SIGTERM to every process of the instance (its
  descendants and the other members of its session, nothing else on the machine), and
  SIGKILL to those left after a few seconds.

The starting process connects as a driver with ``ray.init(address=...)`` after
:func:`prepare_driver` (Ray would otherwise turn 127.0.0.1 into the outward address and
find nothing listening there). Ray's logs stay in ``<temp_dir>/session_latest/logs``.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback

LOOPBACK = "127.0.0.1"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_STARTED: list[Instance] = []  # this process's instances: their pipes stay open


class Instance:
  """A local instance this process started: ``address`` (its GCS, ``127.0.0.1:port``),
  ``temp_dir`` (Ray's folder: logs in ``session_latest/logs``), ``watchdog`` (the
  process that ends it)."""

  def __init__(self, address: str, temp_dir: str, watchdog: subprocess.Popen, fd: int):
    self.address = address
    self.temp_dir = temp_dir
    self.watchdog = watchdog
    self._fd = fd  # the pipe's write end, open for this process's lifetime

  def logs(self) -> str:
    return os.path.join(self.temp_dir, "session_latest", "logs")


def current() -> Instance | None:
  """The instance this process started last (None: none)."""
  return _STARTED[-1] if _STARTED else None


def prepare_driver(ray) -> None:
  """Makes Ray in this process connect to a local instance as its own processes do: with
  127.0.0.1 as this node's address (cluster mode off; otherwise Ray replaces 127.0.0.1
  in ``ray.init(address=...)`` by the host's outward address, where nothing listens)
  and with the instance's token authentication (:func:`start` hands the same variables
  to the instance). Before ``ray.init`` and :func:`start`.

  Raises:
    RuntimeError: this Ray does not take 127.0.0.1 as the node's address even so.
  """
  auth = _auth_env()
  os.environ.update({**auth, CLUSTER_ENV: "0"})
  # Ray reads both when it is imported (the sweep imports it late, a notebook or an
  # --import module may have imported it already): set what they set, and re-read the
  # configuration as Ray's own ray.init does when it turns token authentication on.
  importlib.import_module("ray._private.ray_constants").ENABLE_RAY_CLUSTER = False
  if auth:
    importlib.import_module("ray._raylet").Config.initialize("")
  address = ray.util.get_node_ip_address()
  if address != LOOPBACK:
    raise RuntimeError(
      f"Ray {ray.__version__} takes {address} as this node's address with "
      f"{CLUSTER_ENV}=0; a local Ray instance listens on {LOOPBACK} only. Start a "
      "cluster (docs/cluster.md) and pass --ray_address."
    )


def _auth_env() -> dict[str, str]:
  """Token authentication for the instance and this process's connection to it, unless
  ``RAY_AUTH_MODE`` already says what to do (Ray's own default for a new local
  instance since 2.59, with a token of its own instead of ``~/.ray/auth_token``)."""
  if AUTH_MODE_ENV in os.environ:
    return {}
  env = {AUTH_MODE_ENV: "token"}
  if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # 256 bits, Ray's own token size
  return env


def start(
  num_cpus: int | None = None, num_gpus: int | None = None, timeout: float = 300.0
) -> Instance:
  """Starts a local instance (``num_cpus``/``num_gpus``: None detects them) and returns
  once it accepts drivers; it ends when this process ends.
  Connect with ``ray.init(address=instance.address)``, after :func:`prepare_driver`
  (which also sets the ``RAY_AUTH_*`` variables the instance gets).

  Raises:
    RuntimeError: it did not start within ``timeout`` seconds (naming its log).
  """
  # Short: Ray's socket paths (<temp>/session_<date>_<pid>/sockets/...) must fit in 107
  # bytes, which macOS's $TMPDIR alone nearly fills.
  temp_dir = tempfile.mkdtemp(
    prefix="sparsejax-ray-", dir="/tmp" if os.path.isdir("/tmp") else None
  )
  log_path = os.path.join(temp_dir, "watchdog.log")
  path = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
  env = {**os.environ, **_auth_env(), CLUSTER_ENV: "0", "PYTHONPATH": path}
  parent_r, parent_w = os.pipe()  # not inherited by other children (O_CLOEXEC)
  status_r, status_w = os.pipe()
  cmd = [sys.executable, "-m", "experiments.ray_local", str(parent_r), str(status_w), temp_dir]
  cmd += [str(-1 if num_cpus is None else num_cpus), str(-1 if num_gpus is None else num_gpus)]
  try:
    with open(log_path, "ab") as log:
      watchdog = subprocess.Popen(
        cmd,
        pass_fds=(parent_r, status_w),
        start_new_session=True,  # no terminal's Ctrl-C: this process decides when to end it
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
      )
  except BaseException:
    os.close(parent_w)
    raise
  finally:
    os.close(parent_r)
    os.close(status_w)
  try:
    status = _read_status(status_r, timeout)
  finally:
    os.close(status_r)
  if "address" not in status:
    os.close(parent_w)  # the watchdog ends whatever it started once ray.init returns
    try:
      watchdog.wait(timeout=30)
    except subprocess.TimeoutExpired:  # still in ray.init: its session, Ray's processes too
      os.killpg(watchdog.pid, signal.SIGKILL)
      watchdog.wait()
    raise RuntimeError(
      f"The local Ray instance did not start ({status.get('error', 'no answer')}); see "
      f"{log_path} and the Ray logs in {temp_dir}."
    )
  instance = Instance(status["address"], temp_dir, watchdog, parent_w)
  _STARTED.append(instance)
  return instance


def _read_status(fd: int, timeout: float) -> dict:
  """The watchdog's one JSON line: {'address': ...} or {'error': ...}; {} when it ended
  or ``timeout`` passed first."""
  data, deadline = b"", time.monotonic() + timeout
  while not data.endswith(b"\n"):
    left = deadline - time.monotonic()
    if left <= 0 or not select.select([fd], [], [], left)[0]:
      return {"error": f"no answer within {timeout:g} s"}
    chunk = os.read(fd, 4096)
    if not chunk:
      return {}
    data += chunk
  return json.loads(data)


# The watchdog (``python -m experiments.ray_local PARENT_FD STATUS_FD TEMP_DIR CPUS GPUS``).


def _linux_subreaper() -> bool:
  if not sys.platform.startswith("linux"):
    return False
  import ctypes  # pylint: disable=import-outside-toplevel

  return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _instance_pids() -> set[int]:
  """The living processes of the instance (Linux, /proc): this watchdog's descendants
  and the other members of its session."""
  me, session = os.getpid(), os.getsid(0)
  children: dict[int, list[int]] = {}
  members = set()
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as f:
        stat = f.read()
    except OSError:  # ended meanwhile
      continue
    # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
    state, ppid, _, sid = stat[stat.rindex(b")") + 2 :].split()[:4]
    if state in (b"Z", b"X"):  # dead: nothing to signal
      continue
    children.setdefault(int(ppid), []).append(int(entry))
    if int(sid) == session:
      members.add(int(entry))
  descendants, todo = set(), [me]
  while todo:
    for child in children.get(todo.pop(), ()):
      descendants.add(child)
      todo.append(child)
  return (descendants | members) - {me}


def _reap() -> None:
  """Collects the exit status of this watchdog's ended children (orphans included)."""
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def _end_instance(grace: float = 5.0) -> None:
  """SIGTERM to every process of the instance, SIGKILL to those left after ``grace`` s
  (and to any started meanwhile) until none is left."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  if not os.path.isdir("/proc"):  # no process table to read: the session's process group
    os.killpg(0, signal.SIGTERM)
    time.sleep(grace)
    os.killpg(0, signal.SIGKILL)  # this watchdog too
    return
  for pid in _instance_pids():
    _signal(pid, signal.SIGTERM)
  deadline, killed = time.monotonic() + grace, set()
  while True:
    _reap()
    left = _instance_pids()
    if not left:
      return
    if time.monotonic() > deadline and left - killed:
      print(f"SIGKILL to {_names(left - killed)}: alive {grace:g} s after SIGTERM.", flush=True)
      for pid in left - killed:
        _signal(pid, signal.SIGKILL)
      killed |= left
    time.sleep(0.1)


def _names(pids) -> str:
  out = []
  for pid in sorted(pids):
    try:
      with open(f"/proc/{pid}/comm") as f:
        out.append(f"{pid} ({f.read().strip()})")
    except OSError:
      out.append(str(pid))
  return ", ".join(out)


def _signal(pid: int, sig: int) -> None:
  try:
    os.kill(pid, sig)
  except ProcessLookupError:
    pass


def _watch(parent_fd: int, parent: int, stopping: list) -> None:
  """Returns once the parent's end of the pipe is closed (it ended), the parent is gone
  (a forked child may still hold the pipe), or SIGTERM came."""
  while not stopping and os.getppid() == parent:
    if select.select([parent_fd], [], [], 1.0)[0] and not os.read(parent_fd, 4096):
      return


def _start_ray(temp_dir: str, cpus: int, gpus: int) -> dict:
  import ray  # pylint: disable=import-outside-toplevel

  context = ray.init(
    num_cpus=None if cpus < 0 else cpus,
    num_gpus=None if gpus < 0 else gpus,
    include_dashboard=False,
    log_to_driver=False,  # the sweep's driver gets its own tasks' output
    _temp_dir=temp_dir,
  )
  node = context.address_info["node_ip_address"]
  if node != LOOPBACK:
    return {"error": f"Ray took {node} as this node's address despite {CLUSTER_ENV}=0"}
  return {"address": context.address_info["gcs_address"]}


def _main(argv: list[str]) -> None:
  parent_fd, status_fd = int(argv[0]), int(argv[1])
  temp_dir, cpus, gpus = argv[2], int(argv[3]), int(argv[4])
  parent = os.getppid()
  stopping: list[int] = []
  signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
  if not _linux_subreaper():
    print("Not a child subreaper: the instance's orphans are found by session only.")
  try:
    status = _start_ray(temp_dir, cpus, gpus)
  except Exception as err:  # pylint: disable=broad-except
    traceback.print_exc()
    status = {"error": f"{type(err).__name__}: {err}"}
  try:
    os.write(status_fd, (json.dumps(status) + "\n").encode())
    os.close(status_fd)
  except OSError:  # the parent is gone already
    pass
  if "address" in status:
    _watch(parent_fd, parent, stopping)
  _end_instance()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # not Ray's exit handlers: they would talk to the GCS just ended


if __name__ == "__main__":
  _main(sys.argv[1:])
