"""Data parallelism: a 1-D device mesh with axis ``'data'``, replicated state.

Every batch is sharded along its first axis and the train state is replicated;
``jax.jit`` partitions the step (gradients and batch-norm statistics are reduced over
the whole global batch, so the result equals one device's up to float summation order).
Multi-host: after ``jax.distributed.initialize`` in every process, the mesh spans all
processes' devices and each process feeds its block of rows of every batch
(:func:`sparsejax.data.process_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

PyTree = Any
DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D mesh with axis 'data' over ``devices`` (default: ``jax.devices()``, every
  process's devices, grouped by process so that each process feeds one block of
  rows of a batch; one process: its local devices)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if not devices:
    raise ValueError("devices is empty; give at least one device.")
  return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
  """``tree`` copied to every device of ``sharding`` (a replicated sharding).

  ``jax.device_put`` when this process holds all of the devices; otherwise (several
  processes) each process passes the same values, and its host copy fills its own
  devices' shards of one global array (PRNG keys through their key data)."""
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def put(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def mesh_of(tree: PyTree) -> Mesh:
  """The mesh the arrays of ``tree`` live on (e.g. a replicated train state's)."""
  sharding = jax.tree.leaves(tree)[0].sharding
  if isinstance(sharding, NamedSharding):
    return sharding.mesh
  return make_mesh(sorted(sharding.device_set, key=lambda d: d.id))


def check_divisible(batch_size: int, mesh: Mesh, name: str) -> None:
  """ValueError naming ``name`` unless ``batch_size`` splits evenly over the mesh."""
  if batch_size % mesh.size:
    raise ValueError(
      f"{name}={batch_size} must be divisible by the number of devices "
      f"({mesh.size}) to shard the batch."
    )
