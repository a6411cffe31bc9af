"""How the library's programs are compiled: ``jit`` with XLA:CPU's cheaper LLVM level.

On XLA:CPU most of the compilation time of a large program goes to LLVM optimizing
one kernel per fusion (e.g. the random initializers or random scores of each layer).
LLVM at -O1 instead of -O3 compiles those programs 2-3x faster and, measured on
VGG-19 and ResNet-18, runs them as fast (convolutions and matrix products are library
calls either way). Other backends compile as usual. The persistent compilation cache
is the caller's choice (the experiment binaries' ``--compilation_cache_dir``); the
library never turns it on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from sparsejax import _jax_compat

#: XLA options of the library's jitted programs on CPU.
CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def jit(fn: Callable, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)``, compiled with :data:`CPU_OPTIONS` when the default
  backend is the CPU (decided at each call, so a process may switch backends) and it
  is called outside any trace (nested in another jit, vmap, ... it is inlined there,
  and jax accepts compiler options only at the top level)."""
  plain = jax.jit(fn, **jit_kwargs)
  cpu = jax.jit(fn, compiler_options=CPU_OPTIONS, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args, **kwargs):
    top = _jax_compat.trace_state_clean() and jax.default_backend() == "cpu"
    return (cpu if top else plain)(*args, **kwargs)

  call.plain, call.cpu = plain, cpu
  return call


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class CompileLog:
  """Counts the XLA compilations made while it is active (``with CompileLog() as log``).

  count: programs compiled or loaded from the persistent cache; seconds: their total
  time; cache_hits: how many of them came from the persistent cache; names: the
  jitted functions' names, in order. Listens to ``jax.monitoring`` events.
  """

  def __init__(self):
    self.count, self.seconds, self.cache_hits, self.names = 0, 0.0, 0, []

  def _duration(self, event, duration, **kwargs):
    if event == _COMPILE_EVENT:
      self.count += 1
      self.seconds += float(duration)
      self.names.append(str(kwargs.get("fun_name", "?")))

  def _event(self, event, **kwargs):
    del kwargs
    if event == _CACHE_HIT_EVENT:
      self.cache_hits += 1

  def __enter__(self) -> CompileLog:
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._duration)
    jax.monitoring.unregister_event_listener(self._event)
    return False
