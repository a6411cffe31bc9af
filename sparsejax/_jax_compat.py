"""The one place sparsejax reaches past JAX's stable API (checked against JAX 0.10.2).

The rest of the library imports JAX's program representation, source locations and
trace state from here, never from ``jax._src``. Each name says where it comes from, why
it is needed, and what happens if JAX moves it.

- :class:`Jaxpr`, :class:`ClosedJaxpr`, :class:`Literal` (the connectivity transform
  walks a traced program): public in ``jax.extend.core``; before that module had them,
  public in ``jax.core`` (deprecated there from JAX 0.10).
- :func:`source_line`: ``jax.extend.source_info_util.summarize``, to name the user's
  line in the connectivity transform's errors. If it moves, errors say "unknown
  source" instead of a file and line; nothing else changes.
- :func:`bind_params`: ``Primitive.get_bind_params`` (public on
  ``jax.extend.core.Primitive``) returned ``(subfuns, params)`` before JAX 0.7 and
  returns ``params`` since; both are accepted. Used to re-apply a traced equation.
- :func:`trace_state_clean` (the one internal, ``jax._src.core.trace_state_clean``):
  whether a call happens outside every trace (jit, vmap, grad, ...).
  :func:`sparsejax.compilation.jit` passes XLA compiler options only there, since JAX
  rejects them on a jit nested in another trace, and JAX has no public way to ask.
  If JAX moves it, the fallback answers False: programs then compile with XLA's
  default LLVM level (2-3x slower compilation on CPU, identical results), and
  tests/test_compilation.py fails so that CI notices.
"""

from __future__ import annotations

try:
  from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
except ImportError:  # JAX before jax.extend.core held the program classes
  from jax.core import ClosedJaxpr, Jaxpr, Literal

try:
  from jax.extend.source_info_util import summarize as _summarize
except ImportError:  # no public source summaries: errors say "unknown source"
  _summarize = None

try:
  from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # moved: see the module docstring (compile with default options)
  _trace_state_clean = None

__all__ = ["ClosedJaxpr", "Jaxpr", "Literal", "bind_params", "source_line", "trace_state_clean"]


def source_line(eqn) -> str:
  """The user's source line of a jaxpr equation ('file:line (function)', then the Flax
  module path when there is one), or '' where JAX cannot say (an equation inside a
  library's own jit: the caller names the call site instead)."""
  if _summarize is None:
    return ""
  try:
    line = _summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""
  stack = str(getattr(eqn.source_info, "name_stack", "") or "")
  return f"{line}, module {stack}" if line and stack else line


def bind_params(prim, params: dict) -> tuple[tuple, dict]:
  """(subfuns, params) that ``prim.bind(*subfuns, *args, **params)`` takes to re-apply
  an equation with ``params`` (its ``eqn.params``)."""
  got = prim.get_bind_params(params)
  return got if isinstance(got, tuple) else ((), got)  # (subfuns, params) before JAX 0.7


def trace_state_clean() -> bool:
  """Whether the caller runs outside every JAX trace (False where JAX cannot say)."""
  return False if _trace_state_clean is None else bool(_trace_state_clean())
