"""Data: dataset specs, TFDS loading, synthetic data, batching, preprocessing.

The host keeps each split in memory as uint8 images [N, H, W, C] and int32 labels
[N]; per step it only gathers a batch of uint8 and puts it on the device.
Normalization and augmentation are jit-able JAX functions meant to run inside the
train step on the accelerator (method.md section 5):

- mnist: (x/255 - 0.1307) / 0.3081; random rotation, uniform in [-4, 4] degrees.
- cifar10, cifar100, tiny_imagenet: per-channel normalization; random horizontal
  flip and random integer shift in [-4, 4] on both axes with zero padding.

Zero fill means a black raw pixel (0), so on normalized images the fill value is
(0 - mean) / std per channel: augmenting normalized images this way gives exactly
what augmenting raw images and then normalizing would.

Batching is a pure function of (seed, step) (:func:`batch_indices`): a run resumed
at step s sees exactly the batches an uninterrupted run would.

Offline preparation: TFDS prepares a dataset from the raw files it would download
when they are in ``manual_dir`` (``tfds.download.DownloadConfig(manual_dir=...)``).
Tiny ImageNet is not in the TFDS catalog; :class:`TinyImagenetFolder` reads the
official unzipped ``tiny-imagenet-200/`` folder.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# TFDS 4.9.10 imports `importlib_resources` when it prepares a dataset but does not
# declare it for Python >= 3.9 (tensorflow/datasets#11212). The standard library
# module has the API it uses (`abc.Traversable`) from Python 3.11 on.
if importlib.util.find_spec("importlib_resources") is None:
  try:
    import importlib.resources
    import importlib.resources.abc  # noqa: F401  (makes `.abc` an attribute)

    sys.modules.setdefault("importlib_resources", importlib.resources)
  except ImportError:  # Python 3.10: `pip install importlib_resources`.
    pass

import tensorflow_datasets as tfds  # noqa: E402

MANUAL_DIR_ENV = "SPARSEJAX_TFDS_MANUAL_DIR"
DATA_DIR_ENV = "SPARSEJAX_TFDS_DATA_DIR"

Batch = dict[str, Any]


# --------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the pipeline needs to know about a dataset.

  Attributes:
    name: registry name.
    image_shape: (H, W, C) of one image.
    num_classes: labels are int32 in [0, num_classes).
    mean, std: per-channel normalization in the [0, 1] scale (length C).
    augmentation: "rotate" (mnist) or "flip_shift" (cifar, tiny imagenet).
    max_rotation_deg: rotation angle is uniform in [-max, max] degrees.
    max_shift: shifts are integers uniform in [-max, max] pixels on both axes.
    num_train, num_test: sizes of the real splits.
    tfds_name: TFDS builder name.
    tfds_test_split: TFDS split used as "test" (Tiny ImageNet has no labelled test).
    manual_files: paths, relative to manual_dir, that offline preparation needs.
    manual_hint: where those files come from.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augmentation: str
  max_rotation_deg: float = 0.0
  max_shift: int = 0
  num_train: int = 0
  num_test: int = 0
  tfds_name: str = ""
  tfds_test_split: str = "test"
  manual_files: tuple[str, ...] = ()
  manual_hint: str = ""


_MNIST_FILES = (
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
)

DATASETS: dict[str, DatasetSpec] = {
  "mnist": DatasetSpec(
    name="mnist",
    image_shape=(28, 28, 1),
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    augmentation="rotate",
    max_rotation_deg=4.0,
    num_train=60_000,
    num_test=10_000,
    tfds_name="mnist",
    manual_files=_MNIST_FILES,
    manual_hint="the four official MNIST idx .gz files "
    "(https://storage.googleapis.com/cvdf-datasets/mnist/), not unzipped",
  ),
  "cifar10": DatasetSpec(
    name="cifar10",
    image_shape=(32, 32, 3),
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augmentation="flip_shift",
    max_shift=4,
    num_train=50_000,
    num_test=10_000,
    tfds_name="cifar10",
    manual_files=("cifar-10-binary.tar.gz",),
    manual_hint="the official tarball "
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, not extracted",
  ),
  "cifar100": DatasetSpec(
    name="cifar100",
    image_shape=(32, 32, 3),
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    augmentation="flip_shift",
    max_shift=4,
    num_train=50_000,
    num_test=10_000,
    tfds_name="cifar100",
    manual_files=("cifar-100-binary.tar.gz",),
    manual_hint="the official tarball "
    "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz, not extracted",
  ),
  # The paper gives no statistics for Tiny ImageNet; these are the usual ImageNet
  # mean/std (Tiny ImageNet is a 64x64 subset of ImageNet).
  "tiny_imagenet": DatasetSpec(
    name="tiny_imagenet",
    image_shape=(64, 64, 3),
    num_classes=200,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    augmentation="flip_shift",
    max_shift=4,
    num_train=100_000,
    num_test=10_000,
    tfds_name="tiny_imagenet_folder",
    tfds_test_split="validation",
    manual_files=(
      "tiny-imagenet-200/wnids.txt",
      "tiny-imagenet-200/train",
      "tiny-imagenet-200/val/images",
      "tiny-imagenet-200/val/val_annotations.txt",
    ),
    manual_hint="the folder tiny-imagenet-200/ unzipped from "
    "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
  ),
}


def get_spec(name: str) -> DatasetSpec:
  """The :class:`DatasetSpec` registered as ``name``; ValueError if unknown."""
  if name not in DATASETS:
    raise ValueError(f"name={name!r} is not a known dataset; allowed: {sorted(DATASETS)}")
  return DATASETS[name]


def _as_spec(spec: DatasetSpec | str) -> DatasetSpec:
  return get_spec(spec) if isinstance(spec, str) else spec


def _check_split(split: str) -> None:
  if split.split("[")[0] not in ("train", "test"):
    raise ValueError(
      f"split={split!r} is not allowed; use 'train' or 'test' "
      "(optionally sliced, e.g. 'train[:90%]')"
    )


# ---------------------------------------------------------------- TFDS loading


class MissingDataError(FileNotFoundError, ValueError):
  """A dataset is neither prepared nor preparable offline; says what to put where."""


class TinyImagenetFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Tiny ImageNet (200 classes, 64x64x3) from the official unzipped folder.

  Reads ``<manual_dir>/tiny-imagenet-200/``: ``wnids.txt``,
  ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by
  ``val/val_annotations.txt`` (tab-separated: file name, wnid, box). Splits
  ``train`` and ``validation`` (the test images have no labels). Label i is the
  i-th wnid in sorted order, as in torchvision's ImageFolder. JPEG bytes are
  stored unchanged; the few grayscale images decode to 3 channels.

  Not registered in the TFDS catalog (re-importing this module must not collide);
  :func:`load_split` instantiates it directly.
  """

  name = "tiny_imagenet_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official tiny-imagenet-200 folder layout."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it in "
    "manual_dir so that manual_dir/tiny-imagenet-200/wnids.txt exists."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=200),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="http://cs231n.stanford.edu/",
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir / "tiny-imagenet-200"
    wnids = sorted((root / "wnids.txt").read_text().split())
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    return {
      "train": self._generate_examples(root, "train", label_of),
      "validation": self._generate_examples(root, "validation", label_of),
    }

  def _generate_examples(self, root, split, label_of):
    if split == "train":
      for wnid, label in label_of.items():
        for path in sorted((root / "train" / wnid / "images").glob("*.JPEG")):
          yield path.name, {"image": path, "label": label}
      return
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
      if line.strip():
        fname, wnid = line.split("\t")[:2]
        yield fname, {"image": root / "val" / "images" / fname, "label": label_of[wnid]}


def _builder(spec: DatasetSpec, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if spec.name == "tiny_imagenet":
    return TinyImagenetFolder(data_dir=data_dir)
  return tfds.builder(spec.tfds_name, data_dir=data_dir)


def _missing_data_error(spec, builder, manual_dir, missing, cause=None) -> MissingDataError:
  where = (
    f"manual_dir={manual_dir!r}"
    if manual_dir
    else f"a manual_dir (argument manual_dir or ${MANUAL_DIR_ENV})"
  )
  missing_txt = f" It lacks: {', '.join(missing)}." if missing else ""
  return MissingDataError(
    f"Dataset {spec.name!r} is not prepared in data_dir={builder.data_dir_root!s} "
    f"and cannot be prepared offline.{missing_txt} Put {spec.manual_hint} in "
    f"{where}: it must contain {', '.join(spec.manual_files)}. TFDS then prepares "
    f"it once into data_dir (argument data_dir or ${DATA_DIR_ENV})."
    + (f" TFDS said: {type(cause).__name__}: {cause}" if cause is not None else "")
  )


def load_split(
  name: str, split: str, *, data_dir: str | None = None, manual_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole split through TFDS into memory.

  Does what ``tfds.load(name, split=split, batch_size=-1, as_supervised=True,
  download_and_prepare_kwargs={"download_config": DownloadConfig(manual_dir=...)})``
  does, on a builder we pick (Tiny ImageNet has our own), and checks the manual
  files before TFDS could reach for the network.

  Args:
    name: a key of :data:`DATASETS`.
    split: "train" or "test", optionally sliced ("train[:90%]"); Tiny ImageNet's
      "test" is its labelled validation split.
    data_dir: where TFDS keeps prepared data; default ``$SPARSEJAX_TFDS_DATA_DIR``,
      then TFDS's default (``~/tensorflow_datasets``).
    manual_dir: folder with the raw files (see ``DatasetSpec.manual_files``);
      default ``$SPARSEJAX_TFDS_MANUAL_DIR``. Without one, TFDS downloads the
      catalog datasets (needs internet); Tiny ImageNet always needs one.

  Returns:
    images uint8 [N, H, W, C], labels int32 [N].

  Raises:
    MissingDataError (a FileNotFoundError and a ValueError) naming the files and
    the folder when the data is neither prepared nor preparable.
  """
  spec = get_spec(name)
  _check_split(split)
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
  manual_dir = manual_dir or os.environ.get(MANUAL_DIR_ENV) or None
  builder = _builder(spec, data_dir)
  if not builder.is_prepared():
    if manual_dir is None and spec.name == "tiny_imagenet":
      raise _missing_data_error(spec, builder, None, [])
    if manual_dir is not None:
      missing = [f for f in spec.manual_files if not os.path.exists(os.path.join(manual_dir, f))]
      if missing:
        raise _missing_data_error(spec, builder, manual_dir, missing)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    try:
      builder.download_and_prepare(download_config=config)
    except Exception as err:  # Offline download or corrupt files; keep the cause.
      raise _missing_data_error(spec, builder, manual_dir, [], err) from err
  tfds_split = spec.tfds_test_split + split[4:] if split.startswith("test") else split
  ds = builder.as_dataset(split=tfds_split, batch_size=-1, as_supervised=True)
  images, labels = tfds.as_numpy(ds)
  return np.asarray(images, np.uint8), np.asarray(labels, np.int32)


# -------------------------------------------------------------- synthetic data


def synthetic_split(
  name: str, split: str, num_examples: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """Random data with the shapes and dtypes of a real split, and learnable labels.

  Each class has a fixed low-frequency pattern (a random 4x4 grid per channel,
  upsampled, so flips/shifts/rotations keep it recognizable); an image is its
  class pattern plus Gaussian noise (std 40 of 255). The patterns depend on
  (name, seed) only, so train and test share them and test accuracy measures
  learning.

  Args:
    name: a key of :data:`DATASETS`.
    split: "train" or "test".
    num_examples: N; default 1024 for train, 256 for test.
    seed: non-negative int.

  Returns:
    images uint8 [N, H, W, C], labels int32 [N] in [0, num_classes).
  """
  spec = get_spec(name)
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r} is not allowed; use 'train' or 'test'")
  if num_examples is None:
    num_examples = 1024 if split == "train" else 256
  if num_examples < 1:
    raise ValueError(f"num_examples={num_examples} must be at least 1")
  h, w, c = spec.image_shape
  pattern_rng = np.random.default_rng([seed, sum(map(ord, name))])
  grid = pattern_rng.uniform(32, 224, (spec.num_classes, 4, 4, c))
  patterns = np.repeat(np.repeat(grid, -(-h // 4), axis=1), -(-w // 4), axis=2)[:, :h, :w]
  rng = np.random.default_rng([seed, sum(map(ord, name)), 1 if split == "train" else 2])
  labels = rng.integers(0, spec.num_classes, num_examples).astype(np.int32)
  noise = rng.normal(0.0, 40.0, (num_examples, h, w, c))
  images = np.clip(np.rint(patterns[labels] + noise), 0, 255).astype(np.uint8)
  return images, labels


# ------------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the remainder is dropped)."""
  return num_examples // batch_size


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of examples in ``epoch``: int64 [num_examples], read-only.

  A fresh permutation per (seed, epoch) from ``np.random.default_rng``; cached
  because every step of an epoch slices the same one.
  """
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of the examples in training batch ``step``: int64 [batch_size].

  Step s is slice s mod (N // B) of the permutation of epoch s // (N // B); the
  last N mod B examples of each epoch's order are dropped. A pure function of
  (seed, step), so resuming at step s reproduces an uninterrupted run.
  """
  for arg, value, low in (
    ("num_examples", num_examples, 1),
    ("batch_size", batch_size, 1),
    ("seed", seed, 0),
    ("step", step, 0),
  ):
    if int(value) != value or value < low:
      raise ValueError(f"{arg}={value!r} must be an integer >= {low}")
  if batch_size > num_examples:
    raise ValueError(f"batch_size={batch_size} must be <= num_examples={num_examples}")
  epoch, i = divmod(int(step), steps_per_epoch(num_examples, batch_size))
  return epoch_permutation(int(num_examples), int(seed), epoch)[
    i * batch_size : (i + 1) * batch_size
  ]


# ------------------------------------------------------ preprocessing (in JAX)


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


# -------------------------------------------------------------- host iterators


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def process_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> tuple[int, int]:
  """Rows ``[lo, hi)`` of a global batch of ``batch_size`` examples that this process's
  devices hold under ``sharding`` (batch axis first): ``(0, batch_size)`` unless the
  sharding spans devices of other processes (multi-host data parallelism).

  Raises:
    ValueError: this process's rows are not one contiguous block (a mesh whose devices
      are not grouped by process).
  """
  if sharding is None or sharding.is_fully_addressable:
    return 0, batch_size
  spans = sorted(
    {
      (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
      for s in sharding.addressable_devices_indices_map((batch_size,)).values()
    }
  )
  if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
    raise ValueError(
      f"sharding={sharding!r} gives process {jax.process_index()} the rows "
      f"{spans} of a batch, not one block; order the mesh's devices by process."
    )
  return spans[0][0], spans[-1][1]


def _put(sharding, global_size: int):
  """Host batch -> device arrays: ``jax.device_put`` onto ``sharding``; when the
  sharding spans several processes, the batch holds only this process's rows
  (:func:`process_rows`) and becomes a global array of ``global_size`` rows."""
  if sharding is None:
    return jax.device_put
  if sharding.is_fully_addressable:
    return lambda b: jax.device_put(b, sharding)
  return lambda b: jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, x, (global_size,) + x.shape[1:]), b
  )


def _prefetch(batches: Iterable[Batch], size: int, put=None) -> Iterator[Batch]:
  """Puts host batches on the devices (``put``, default ``jax.device_put``) ``size``
  ahead, from a background thread."""
  put = put or jax.device_put
  if size <= 0:  # Synchronous: simpler to debug.
    for batch in batches:
      yield put(batch)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def offer(item) -> bool:
    # Time out so that the thread ends when the consumer stops early.
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for batch in batches:
        if not offer(put(batch)):
          return
      offer(_END)
    except BaseException as err:  # Re-raised in the consumer.
      offer(_Raised(err))

  threading.Thread(target=produce, daemon=True, name="sparsejax-prefetch").start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  seed: int,
  start_step: int = 0,
  prefetch: int = 2,
  *,
  num_steps: int | None = None,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """Training batches from step ``start_step`` on, as :func:`batch_indices` orders them.

  Args:
    images: uint8 [N, H, W, C] on the host.
    labels: int32 [N].
    batch_size: B (<= N).
    seed: shuffling seed.
    start_step: first step to yield (to resume).
    prefetch: batches put on the device ahead by a background thread (0: none).
    num_steps: stop after this many batches; None: never stop.
    sharding: passed to ``jax.device_put`` (e.g. a batch-axis NamedSharding). One
      spanning several processes: each process gathers only its rows of every
      batch (:func:`process_rows`) and the batch is a global array.

  Yields:
    {"image": uint8 [B, H, W, C], "label": int32 [B]} as device arrays.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries but images has {n}")
  batch_indices(n, batch_size, seed, start_step)  # Validates the arguments early.
  lo, hi = process_rows(sharding, batch_size)

  def host_batches():
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      idx = batch_indices(n, batch_size, seed, step)[lo:hi]
      yield {"image": images[idx], "label": labels[idx].astype(np.int32)}
      step += 1

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))


def eval_batches(
  images: np.ndarray,
  labels: np.ndarray,
  batch_size: int,
  prefetch: int = 2,
  *,
  sharding: jax.sharding.Sharding | None = None,
) -> Iterator[Batch]:
  """The split in order, ceil(N / B) batches, every one of size B.

  The last batch is padded with zero images and label 0; ``mask`` marks the real
  examples, so a jitted eval step sees one shape and sums ``mask``-weighted
  metrics (accuracy = sum(mask * correct) / sum(mask)).

  Yields:
    {"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]} as device
    arrays.
  """
  n = len(images)
  if len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries but images has {n}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
  lo, hi = process_rows(sharding, batch_size)

  def host_batches():
    for start in range(0, n, batch_size):
      image = images[start : start + batch_size]
      label = labels[start : start + batch_size].astype(np.int32)
      k = len(image)
      mask = np.arange(batch_size) < k
      if k < batch_size:
        image = np.concatenate([image, np.zeros((batch_size - k,) + image.shape[1:], image.dtype)])
        label = np.concatenate([label, np.zeros(batch_size - k, np.int32)])
      yield {"image": image[lo:hi], "label": label[lo:hi], "mask": mask[lo:hi]}

  return _prefetch(host_batches(), prefetch, _put(sharding, batch_size))
