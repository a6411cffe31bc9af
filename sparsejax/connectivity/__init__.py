"""The connectivity transform of a JAX program (method.md section 1).

``apply(params, extra, x)`` (a Flax module's ``apply`` or any JAX function) is traced
once to a jaxpr, call-like primitives (``jit``/``pjit``, ``closed_call``, ``remat``,
``custom_jvp_call``, ``custom_vjp_call``) are inlined, equations of constants only are
folded, and every remaining value is classified as *input-dependent* ('x'),
*parameter-only* ('p') or *constant* ('c'). The program is then evaluated under one of
two semantics:

- reachability (effective masks, units): binary reach indicators forward, gated at
  every sum, and coreach indicators as the cotangent of one vjp, exact at any depth;
- linearized (SynFlow, Tanaka et al., 2020): real flows on an all-ones input with
  |w| as weights, every activation and normalization the identity, rescaled only at
  cuts of the graph (one common factor, the ranking unchanged).

Anything else that depends on the input or the parameters (``while``, ``scan``,
``cond`` on a non-constant predicate, gathers with input-dependent indices, unknown
primitives) raises ValueError naming the primitive and the user's source line; the
accepted primitives are ``supported_primitives()``.

Prunable leaves: by default every parameter that enters a linear op as its weight
operand (through any parameter-only computation: casts, reshapes, masking), in the
order of first use in the traced program (input-to-output order).

Modules, each importing only those above it:

- :mod:`~sparsejax.connectivity.primitives`: the primitive families and the supported
  list;
- :mod:`~sparsejax.connectivity.program`: tracing, inlining, constant folding,
  classification, the linear-op sites and the cuts (:class:`Program`, :func:`build`);
- :mod:`~sparsejax.connectivity.forest`: the union-find forest of dimensions (products
  and concatenations of smaller ones) that dims builds;
- :mod:`~sparsejax.connectivity.dims`: every unit axis followed through a Program (the
  dimensions that :mod:`sparsejax.groups` turns into dependency groups);
- :mod:`~sparsejax.connectivity.xla_cpu`: XLA:CPU speed kernels for the sweep's
  convolutions, equal to the convolution (the semantics call one hook of it);
- :mod:`~sparsejax.connectivity.semantics`: the rule of each family under each
  semantics, with the exact statements (:func:`gate`, ``Evaluator``);
- :mod:`~sparsejax.connectivity.sweeps`: the jit-able sweeps and their results
  (:class:`Connectivity`, :func:`reach_sweep`, :func:`channel_sweep`,
  :func:`position_counts`, :func:`linear_scores`).
"""

from __future__ import annotations

from sparsejax.connectivity import primitives, program, semantics, sweeps, xla_cpu
from sparsejax.connectivity.primitives import (
  ALONG_AXIS,
  CALLS,
  COMPARISONS,
  CUMULATIVE,
  ELEMENTWISE,
  IDENTITY,
  LINEAR,
  REDUCTIONS,
  STRUCTURAL,
  SUPPORTED,
  WINDOWS,
  supported_primitives,
)
from sparsejax.connectivity.program import Eqn, Program, build
from sparsejax.connectivity.semantics import gate
from sparsejax.connectivity.sweeps import (
  Connectivity,
  Masks,
  channel_sweep,
  linear_scores,
  position_counts,
  reach_sweep,
  site_names,
  unit_totals,
)
from sparsejax.connectivity.sweeps import (
  _FrozenDict as _FrozenDict,  # sparsejax.effective builds Connectivity results with it
)
from sparsejax.connectivity.xla_cpu import conv_as_patches, conv_patches_kernel_grad

__all__ = [
  "ALONG_AXIS",
  "CALLS",
  "COMPARISONS",
  "CUMULATIVE",
  "ELEMENTWISE",
  "IDENTITY",
  "LINEAR",
  "REDUCTIONS",
  "STRUCTURAL",
  "SUPPORTED",
  "WINDOWS",
  "Connectivity",
  "Eqn",
  "Masks",
  "Program",
  "build",
  "channel_sweep",
  "conv_as_patches",
  "conv_patches_kernel_grad",
  "gate",
  "linear_scores",
  "position_counts",
  "primitives",
  "program",
  "reach_sweep",
  "semantics",
  "site_names",
  "unit_totals",
  "supported_primitives",
  "sweeps",
  "xla_cpu",
]
