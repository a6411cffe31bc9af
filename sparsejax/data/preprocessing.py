"""Preprocessing in JAX, meant to run inside the jitted train step on the accelerator
(method.md section 5):

- mnist: (x/255 - 0.1307) / 0.3081; random rotation, uniform in [-4, 4] degrees.
- cifar10, cifar100, tiny_imagenet: per-channel normalization; random horizontal
  flip and random integer shift in [-4, 4] on both axes with zero padding.

Zero fill means a black raw pixel (0), so on normalized images the fill value is
(0 - mean) / std per channel: augmenting normalized images this way gives exactly
what augmenting raw images and then normalizing would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.data.specs import DatasetSpec, _as_spec


def normalize(images: jax.Array, spec: DatasetSpec | str) -> jax.Array:
  """(x / 255 - mean) / std per channel: uint8 [..., C] -> float32 [..., C]."""
  spec = _as_spec(spec)
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)


def fill_value(spec: DatasetSpec | str) -> jax.Array:
  """Normalized value of a black (0) raw pixel, float32 [C]: what padding fills with."""
  spec = _as_spec(spec)
  return -jnp.asarray(spec.mean, jnp.float32) / jnp.asarray(spec.std, jnp.float32)


def rotate(image: jax.Array, angle: jax.Array, fill: jax.Array | float = 0.0) -> jax.Array:
  """Rotates one image counterclockwise by ``angle`` radians about its centre.

  Bilinear sampling; output pixels whose source falls outside the image blend
  towards ``fill`` (scalar or [C]). 90 degrees equals ``np.rot90``.

  Args:
    image: float32 [H, W, C].
    angle: scalar, radians.
    fill: scalar or float32 [C].

  Returns:
    float32 [H, W, C].
  """
  h, w, c = image.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
  )
  # Inverse map in (x right, y up) coordinates: output point p samples R(-angle) p.
  x_out, y_out = cols - cx, cy - rows
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x_src = cos * x_out + sin * y_out
  y_src = -sin * x_out + cos * y_out
  coords = [cy - y_src, cx + x_src]
  # A channel of ones, sampled alike, gives the in-bounds weight of each output
  # pixel; the rest goes to `fill`. Exact when angle is 0.
  stacked = jnp.concatenate([image, jnp.ones((h, w, 1), image.dtype)], axis=-1)
  sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, coords, order=1, mode="constant")
  out = jax.vmap(sample, in_axes=2, out_axes=2)(stacked)
  return out[..., :c] + (1.0 - out[..., c:]) * jnp.asarray(fill, image.dtype)


def flip_and_shift(
  image: jax.Array, flip: jax.Array, shift: jax.Array, max_shift: int, fill: jax.Array | float = 0.0
) -> jax.Array:
  """Optionally flips one image left-right, then shifts it by whole pixels.

  Pad ``max_shift`` on every side with ``fill``, then crop: the pixel at (i, j)
  moves to (i + shift[0], j + shift[1]).

  Args:
    image: float32 [H, W, C].
    flip: bool scalar.
    shift: int32 [2] in [-max_shift, max_shift] (rows, cols).
    max_shift: static padding width.
    fill: scalar or float32 [C].

  Returns:
    float32 [H, W, C].
  """
  h, w, c = image.shape
  p = max_shift
  image = jnp.where(flip, image[:, ::-1, :], image)
  padded = jnp.broadcast_to(jnp.asarray(fill, image.dtype), (h + 2 * p, w + 2 * p, c))
  padded = padded.at[p : p + h, p : p + w, :].set(image)
  return jax.lax.dynamic_slice(padded, (p - shift[0], p - shift[1], 0), (h, w, c))


def augment(key: jax.Array, images: jax.Array, spec: DatasetSpec | str) -> jax.Array:
  """Random training augmentation of a normalized batch, per image (method.md 5).

  mnist: rotation by an angle uniform in [-4, 4] degrees. Others: horizontal flip
  with probability 1/2 and a shift uniform in {-4, ..., 4} on each axis. Padding
  is a black raw pixel (:func:`fill_value`). Jit-able with ``spec`` static.

  Args:
    key: PRNG key; the same key gives the same batch.
    images: float32 [B, H, W, C], normalized.
    spec: a :class:`DatasetSpec` or its name.

  Returns:
    float32 [B, H, W, C].
  """
  spec = _as_spec(spec)
  b = images.shape[0]
  fill = fill_value(spec)
  if spec.augmentation == "rotate":
    limit = np.deg2rad(spec.max_rotation_deg)
    angles = jax.random.uniform(key, (b,), minval=-limit, maxval=limit)
    return jax.vmap(rotate, in_axes=(0, 0, None))(images, angles, fill)
  if spec.augmentation == "flip_shift":
    flip_key, shift_key = jax.random.split(key)
    flips = jax.random.bernoulli(flip_key, 0.5, (b,))
    m = spec.max_shift
    shifts = jax.random.randint(shift_key, (b, 2), -m, m + 1)
    fn = lambda x, f, s: flip_and_shift(x, f, s, m, fill)
    return jax.vmap(fn)(images, flips, shifts)
  raise ValueError(
    f"spec.augmentation={spec.augmentation!r} is not allowed; use 'rotate' or 'flip_shift'"
  )


def preprocess(
  key: jax.Array, images: jax.Array, spec: DatasetSpec | str, train: bool
) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, H, W, C]: normalize, then augment if ``train``.

  ``train`` and ``spec`` are static under jit; ``key`` is unused when not training.
  """
  x = normalize(images, spec)
  return augment(key, x, spec) if train else x
