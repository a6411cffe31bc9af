"""big_vision's ViT (pooling 'gap', 'map', 'tok', '0'; optional ``nn.scan`` + ``nn.remat``
layer stack), tiny configs in the tests.

Source: https://github.com/google-research/big_vision, ``big_vision/models/vit.py``
(snapshot at commit 0127fb6b337ee2a27bf4e54dea79cff176527356; the file last changed in
33256536). License: Apache-2.0, Copyright 2024 Big Vision Authors.

Re-implemented, not copied (public repositories' code stays out of this project's
commits): the same Flax layers, transforms and arguments, the same jnp operations in the
same order and the same parameter names (checked against the original source at JAX
0.10.2: the same primitives with the same counts, the same outputs on the same
parameters). Stubbed: ``big_vision.utils`` and ``big_vision.models.common`` (imported by the
original for checkpoint loading only) and SciPy are not needed: the checkpoint helpers
(``resample_posemb``, ``fix_old_checkpoints``, ``load``) are left out; everything the
model's ``__call__`` runs is here.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def posemb_sincos_2d(h, w, width, temperature=10_000.0, dtype=jnp.float32):
  """Fixed 2-D sin-cos position embeddings [1, h*w, width] (MoCo v3)."""
  y, x = jnp.mgrid[:h, :w]
  assert width % 4 == 0, "Width must be mult of 4 for sincos posemb"
  omega = jnp.arange(width // 4) / (width // 4 - 1)
  omega = 1.0 / (temperature**omega)
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


def get_posemb(self, typ, seqshape, width, name, dtype=jnp.float32):
  if typ == "learn":
    init = nn.initializers.normal(stddev=1 / np.sqrt(width))
    return self.param(name, init, (1, np.prod(seqshape), width), dtype)
  if typ == "sincos2d":
    return posemb_sincos_2d(*seqshape, width, dtype=dtype)
  raise ValueError(f"Unknown posemb type: {typ}")


class MlpBlock(nn.Module):
  """Dense(mlp_dim or 4d) -> gelu -> dropout -> Dense(d)."""

  mlp_dim: int | None = None
  dropout: float = 0.0
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    inits = dict(
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
    )
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype_mm, **inits)(x)
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, dtype=self.dtype_mm, **inits)(x)


class Encoder1DBlock(nn.Module):
  """Pre-norm block (self-attention, then MLP); returns (x, intermediates)."""

  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    axes = ("act_batch", "act_len", "act_emb")
    x = nn.with_logical_constraint(x, axes)
    y = nn.LayerNorm()(x)
    y = out["sa"] = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=deterministic,
      dtype=self.dtype_mm,
    )(y, y)
    y = nn.with_logical_constraint(y, axes)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+sa"] = x + y
    y = nn.LayerNorm()(x)
    y = out["mlp"] = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype_mm=self.dtype_mm)(
      y, deterministic
    )
    y = nn.with_logical_constraint(y, axes)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = out["+mlp"] = x + y
    x = nn.with_logical_constraint(x, axes)
    return x, out


class Encoder(nn.Module):
  """``depth`` blocks (unrolled, or ``nn.scan`` over a remat block), then LayerNorm."""

  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, x, deterministic=True):
    out = {}
    if self.scan:
      block = nn.remat(
        Encoder1DBlock,
        prevent_cse=False,
        static_argnums=(2,),  # 0 = self, 2 = deterministic
        policy=getattr(jax.checkpoint_policies, self.remat_policy, None),
      )
      x, scan_out = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=self.depth,
      )(
        name="encoderblock",
        dtype_mm=self.dtype_mm,
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dropout=self.dropout,
      )(x, deterministic)
      for i in range(self.depth):
        out[f"block{i:02d}"] = jax.tree.map(lambda o, i=i: o[i], scan_out)
    else:
      for i in range(self.depth):
        block = Encoder1DBlock(
          name=f"encoderblock_{i}",
          dtype_mm=self.dtype_mm,
          mlp_dim=self.mlp_dim,
          num_heads=self.num_heads,
          dropout=self.dropout,
        )
        x, out[f"block{i:02d}"] = block(x, deterministic)
      out["pre_ln"] = x
    return nn.LayerNorm(name="encoder_norm")(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""

  mlp_dim: int | None = None
  num_heads: int = 12

  @nn.compact
  def __call__(self, x):
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
    probe = jnp.tile(probe, [n, 1, 1])
    x = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, kernel_init=nn.initializers.xavier_uniform()
    )(probe, x)
    y = nn.LayerNorm()(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim)(y)
    return x[:, 0]


class _Model(nn.Module):
  """ViT: image [N, H, W, C] -> (logits [N, num_classes], intermediates)."""

  num_classes: int | None = None
  patch_size: Sequence[int] = (16, 16)
  width: int = 768
  depth: int = 12
  mlp_dim: int | None = None
  num_heads: int = 12
  posemb: str = "learn"
  rep_size: int | bool = False
  dropout: float = 0.0
  pool_type: str = "gap"
  head_zeroinit: bool = True
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, image, *, train=False):
    out = {}
    image = jnp.asarray(image, self.dtype_mm)
    x = out["stem"] = nn.Conv(
      self.width,
      self.patch_size,
      strides=self.patch_size,
      padding="VALID",
      name="embedding",
      dtype=self.dtype_mm,
    )(image)
    n, h, w, c = x.shape
    x = jnp.reshape(x, [n, h * w, c])
    x = out["with_posemb"] = x + get_posemb(self, self.posemb, (h, w), c, "pos_embedding", x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    n, _, c = x.shape
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x, out["encoder"] = Encoder(
      depth=self.depth,
      mlp_dim=self.mlp_dim,
      num_heads=self.num_heads,
      dropout=self.dropout,
      scan=self.scan,
      remat_policy=self.remat_policy,
      dtype_mm=self.dtype_mm,
      name="Transformer",
    )(x, deterministic=not train)
    encoded = out["encoded"] = x
    if self.pool_type == "map":
      x = out["head_input"] = MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_dim)(x)
    elif self.pool_type == "gap":
      x = out["head_input"] = jnp.mean(x, axis=1)
    elif self.pool_type == "0":
      x = out["head_input"] = x[:, 0]
    elif self.pool_type == "tok":
      x = out["head_input"] = x[:, 0]
      encoded = encoded[:, 1:]
    elif self.pool_type != "none":
      raise ValueError(f"Unknown pool type: '{self.pool_type}'")
    x_2d = jnp.reshape(encoded, [n, h, w, -1])
    if self.rep_size:
      rep_size = self.width if self.rep_size is True else self.rep_size
      hid = nn.Dense(rep_size, name="pre_logits")
      x_2d = nn.tanh(hid(x_2d))
      x = nn.tanh(hid(x))
    out["pre_logits_2d"] = x_2d
    out["pre_logits"] = x
    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, name="head", **kw)
      x_2d = out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out


def Model(num_classes=None, *, variant=None, **kw):  # noqa: N802 (the original's name)
  """The ViT of ``variant`` ('S/16', 'B/32', ...) with ``kw`` overriding its fields."""
  return _Model(num_classes, **{**decode_variant(variant), **kw})


def decode_variant(variant):
  """'B' or 'B/32' -> the fields of that size (Table 2 of arXiv:2106.04560)."""
  if variant is None:
    return {}
  v, patch = variant, {}
  if "/" in variant:
    v, p = variant.split("/")
    patch = {"patch_size": (int(p), int(p))}
  sizes = {  # name: (width, depth, mlp_dim, num_heads)
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
  }
  width, depth, mlp_dim, num_heads = sizes[v]
  return {"width": width, "depth": depth, "mlp_dim": mlp_dim, "num_heads": num_heads, **patch}
