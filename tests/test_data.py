"""Tests for sparsejax.data: specs, batching, preprocessing, synthetic and TFDS data."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import data

# ------------------------------------------------------------------- specs


def test_registry_matches_method_md():
  assert set(data.DATASETS) == {"mnist", "cifar10", "cifar100", "tiny_imagenet"}
  mnist = data.get_spec("mnist")
  assert (mnist.image_shape, mnist.num_classes, mnist.mean, mnist.std) == (
    (28, 28, 1),
    10,
    (0.1307,),
    (0.3081,),
  )
  assert (mnist.augmentation, mnist.max_rotation_deg) == ("rotate", 4.0)
  c10 = data.get_spec("cifar10")
  assert (c10.image_shape, c10.num_classes) == ((32, 32, 3), 10)
  assert c10.mean == (0.4914, 0.4822, 0.4465) and c10.std == (0.2470, 0.2435, 0.2616)
  c100 = data.get_spec("cifar100")
  assert (c100.image_shape, c100.num_classes) == ((32, 32, 3), 100)
  assert c100.mean == (0.5071, 0.4865, 0.4409) and c100.std == (0.2673, 0.2564, 0.2762)
  tiny = data.get_spec("tiny_imagenet")
  assert (tiny.image_shape, tiny.num_classes) == ((64, 64, 3), 200)
  assert tiny.mean == (0.485, 0.456, 0.406) and tiny.std == (0.229, 0.224, 0.225)
  for spec in (c10, c100, tiny):
    assert (spec.augmentation, spec.max_shift) == ("flip_shift", 4)
  for name, spec in data.DATASETS.items():
    assert spec.name == name
    assert len(spec.mean) == len(spec.std) == spec.image_shape[-1]
    hash(spec)  # Frozen, so usable as a static jit argument.


def test_unknown_dataset_error_names_value_and_allowed():
  with pytest.raises(ValueError) as err:
    data.get_spec("imagenet")
  msg = str(err.value)
  assert "name" in msg and "'imagenet'" in msg
  for allowed in data.DATASETS:
    assert allowed in msg


def test_bad_split_is_rejected():
  with pytest.raises(ValueError, match="split"):
    data.load_split("mnist", "validation")
  with pytest.raises(ValueError, match="split"):
    data.synthetic_split("mnist", "val")


_TF = "[m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets')]"


def test_training_and_data_import_no_tensorflow_until_real_data_is_loaded():
  """TensorFlow (Datasets) is the optional `data` extra: the library, its training loop
  and the TF-free part of `sparsejax.data` never import it; `data.load_split` does."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  code = (
    "import sys\n"
    "import sparsejax.training, sparsejax.data\n"
    f"print({_TF})\n"
    "sparsejax.data.load_split\n"
    "print('tensorflow_datasets' in sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    cwd="/",
    env={**os.environ, "PYTHONPATH": str(repo)},
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["[]", "True"]


# ---------------------------------------------------------------- batching


def _stream(n, b, seed, start, count):
  return np.stack([data.batch_indices(n, b, seed, s) for s in range(start, start + count)])


def test_batch_indices_deterministic_and_seed_dependent():
  a = _stream(100, 10, 3, 0, 25)
  np.testing.assert_array_equal(a, _stream(100, 10, 3, 0, 25))
  assert not np.array_equal(a, _stream(100, 10, 4, 0, 25))
  assert a.dtype.kind == "i" and a.shape == (25, 10)


@settings(max_examples=60, deadline=None)
@given(
  n=st.integers(1, 60),
  b=st.integers(1, 60),
  seed=st.integers(0, 2**31 - 1),
  epochs=st.integers(1, 3),
)
def test_each_epoch_is_a_permutation(n, b, seed, epochs):
  b = min(b, n)
  spe = data.steps_per_epoch(n, b)
  stream = _stream(n, b, seed, 0, spe * epochs).reshape(epochs, spe * b)
  for e, epoch in enumerate(stream):
    perm = data.epoch_permutation(n, seed, e)
    np.testing.assert_array_equal(epoch, perm[: spe * b])  # The dropped tail is last.
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))  # Each index once.
    assert len(np.unique(epoch)) == spe * b


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), b=st.integers(1, 50), seed=st.integers(0, 1000), s=st.integers(0, 40))
def test_resume_reproduces_tail_of_uninterrupted_stream(n, b, seed, s):
  b = min(b, n)
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  labels = np.arange(n, dtype=np.int32)  # Labels are the indices: easy to check.
  full = list(data.train_batches(images, labels, b, seed, num_steps=s + 5, prefetch=1))
  resumed = list(data.train_batches(images, labels, b, seed, start_step=s, num_steps=5, prefetch=0))
  assert len(full) == s + 5 and len(resumed) == 5
  for k, (x, y) in enumerate(zip(full[s:], resumed)):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(y["label"], data.batch_indices(n, b, seed, s + k))


def test_batch_indices_validates_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    data.batch_indices(10, 11, 0, 0)
  with pytest.raises(ValueError, match="seed"):
    data.batch_indices(10, 2, -1, 0)
  with pytest.raises(ValueError, match="step"):
    data.batch_indices(10, 2, 0, -3)


def test_train_batches_yield_device_batches_and_stop_early():
  images, labels = data.synthetic_split("cifar10", "train", num_examples=50)
  it = data.train_batches(images, labels, 16, seed=1)
  batches = [next(it) for _ in range(7)]  # More than an epoch (3 steps).
  it.close()  # Consumer stops early: the prefetch thread must end.
  deadline = time.monotonic() + 5
  while any(t.name == "sparsejax-prefetch" for t in threading.enumerate()):
    assert time.monotonic() < deadline, "prefetch thread still running after close()"
    time.sleep(0.02)
  for s, batch in enumerate(batches):
    assert isinstance(batch["image"], jax.Array)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == jnp.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == jnp.int32
    idx = data.batch_indices(50, 16, 1, s)
    np.testing.assert_array_equal(batch["image"], images[idx])
    np.testing.assert_array_equal(batch["label"], labels[idx])


def test_train_batches_accept_sharding():
  images, labels = data.synthetic_split("mnist", "train", num_examples=20)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  batch = next(data.train_batches(images, labels, 4, 0, sharding=sharding))
  assert batch["image"].sharding == sharding


def test_eval_batches_in_order_with_padded_mask():
  images, labels = data.synthetic_split("mnist", "test", num_examples=23)
  batches = list(data.eval_batches(images, labels, 10))
  assert len(batches) == 3
  for batch in batches:
    assert batch["image"].shape == (10, 28, 28, 1) and batch["mask"].shape == (10,)
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches])
  np.testing.assert_array_equal(mask, np.arange(30) < 23)
  got = np.concatenate([np.asarray(b["image"]) for b in batches])
  np.testing.assert_array_equal(got[:23], images)
  assert not got[23:].any()
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:23], labels)


def test_prefetch_reraises_producer_errors():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  with pytest.raises(ValueError, match="labels"):
    data.train_batches(images, np.zeros(3, np.int32), 2, 0)

  def broken():
    yield {"x": np.zeros(2)}
    raise RuntimeError("boom")

  it = data._prefetch(broken(), 2, None)
  next(it)
  with pytest.raises(RuntimeError, match="boom"):
    next(it)


# ----------------------------------------------------------- preprocessing


def test_normalize_closed_form():
  img = np.array([0, 255, 51], np.uint8).reshape(3, 1, 1, 1)
  got = np.asarray(data.normalize(img, "mnist")).ravel()
  np.testing.assert_allclose(
    got, [(0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081, (0.2 - 0.1307) / 0.3081], rtol=1e-6
  )
  img = np.full((1, 2, 2, 3), 255, np.uint8)
  got = np.asarray(data.normalize(img, data.get_spec("cifar10")))
  assert got.dtype == np.float32
  expect = (1 - np.array([0.4914, 0.4822, 0.4465])) / np.array([0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(got[0, 0, 0], expect, rtol=1e-6)
  np.testing.assert_allclose(
    data.fill_value("cifar10"), data.normalize(np.zeros((1, 1, 1, 3), np.uint8), "cifar10")[0, 0, 0]
  )


def _rand_image(h, w, c, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(h, w, c)), jnp.float32)


def test_rotate_zero_is_identity_and_quarter_turn_is_rot90():
  x = _rand_image(28, 28, 1)
  np.testing.assert_array_equal(data.rotate(x, 0.0, fill=-0.42), x)
  y = _rand_image(8, 8, 3)
  np.testing.assert_allclose(data.rotate(y, np.pi / 2), np.rot90(np.asarray(y), k=1), atol=1e-5)


def test_rotate_small_angle_keeps_centre_and_fills_corners():
  x = _rand_image(29, 29, 2)  # Odd size: the centre is a pixel.
  for deg in (-4.0, 1.5, 4.0):
    out = data.rotate(x, np.deg2rad(deg), fill=jnp.array([3.0, -1.0]))
    np.testing.assert_allclose(out[14, 14], x[14, 14], atol=1e-5)
  out = data.rotate(jnp.zeros((28, 28, 1)), np.pi / 4, fill=7.0)
  np.testing.assert_allclose(out[0, 0], [7.0], atol=1e-5)  # Corner comes from outside.
  np.testing.assert_allclose(out[14, 14], [0.0], atol=1e-5)


def test_flip_and_shift_identity_flip_twice_and_known_pixel():
  x = _rand_image(32, 32, 3)
  np.testing.assert_array_equal(data.flip_and_shift(x, False, jnp.array([0, 0]), 4), x)
  once = data.flip_and_shift(x, True, jnp.array([0, 0]), 4)
  np.testing.assert_array_equal(once, x[:, ::-1])
  np.testing.assert_array_equal(data.flip_and_shift(once, True, jnp.array([0, 0]), 4), x)

  img = jnp.zeros((32, 32, 3)).at[10, 20].set(1.0)
  fill = jnp.array([-1.0, -2.0, -3.0])
  out = data.flip_and_shift(img, False, jnp.array([3, -4]), 4, fill)
  np.testing.assert_array_equal(out[13, 16], [1.0, 1.0, 1.0])
  assert float(jnp.sum(out == 1.0)) == 3  # Moved, not copied.
  np.testing.assert_array_equal(out[:3, 5], jnp.broadcast_to(fill, (3, 3)))  # From above.
  np.testing.assert_array_equal(out[5, 28:], jnp.broadcast_to(fill, (4, 3)))
  flipped = data.flip_and_shift(img, True, jnp.array([-2, 1]), 4)
  assert flipped[8, 32 - 1 - 20 + 1, 0] == 1.0


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_augment_shape_dtype_determinism(name):
  spec = data.get_spec(name)
  images, _ = data.synthetic_split(name, "train", num_examples=6)
  x = data.normalize(images, spec)
  fn = jax.jit(data.augment, static_argnums=2)
  a = fn(jax.random.key(0), x, spec)
  assert a.shape == x.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, fn(jax.random.key(0), x, spec))
  assert not np.array_equal(a, fn(jax.random.key(1), x, spec))
  assert not np.array_equal(a, x)
  # Bilinear blends and black fills stay within the range of normalized pixels.
  assert float(a.min()) >= float(jnp.min(data.fill_value(spec))) - 1e-5
  pre = jax.jit(data.preprocess, static_argnums=(2, 3))
  np.testing.assert_allclose(pre(jax.random.key(0), images, spec, True), a, atol=1e-5)
  np.testing.assert_allclose(pre(jax.random.key(0), images, spec, False), x, atol=1e-6)


def test_flip_shift_augment_only_flips_and_shifts():
  # Every augmented image is one of the 2 * 9 * 9 flips and shifts, built here in numpy.
  spec = data.get_spec("cifar10")
  x = np.asarray(_rand_image(32, 32, 3))
  out = np.asarray(data.augment(jax.random.key(3), jnp.asarray(x)[None].repeat(4, 0), spec))
  fill = np.asarray(data.fill_value(spec))
  candidates = []
  for img in (x, x[:, ::-1]):
    padded = np.broadcast_to(fill, (40, 40, 3)).copy()
    padded[4:36, 4:36] = img
    candidates += [
      padded[4 - dy : 36 - dy, 4 - dx : 36 - dx] for dy in range(-4, 5) for dx in range(-4, 5)
    ]
  for img in out:
    assert any(np.array_equal(img, c) for c in candidates)


# --------------------------------------------------------------- synthetic


@pytest.mark.parametrize("name", sorted(data.DATASETS))
def test_synthetic_shapes_dtypes_labels(name):
  spec = data.get_spec(name)
  images, labels = data.synthetic_split(name, "train", num_examples=40, seed=2)
  assert images.shape == (40,) + spec.image_shape and images.dtype == np.uint8
  assert labels.shape == (40,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < spec.num_classes
  again, _ = data.synthetic_split(name, "train", num_examples=40, seed=2)
  np.testing.assert_array_equal(images, again)
  test_images, _ = data.synthetic_split(name, "test")
  assert test_images.shape == (256,) + spec.image_shape


def test_synthetic_is_learnable_by_nearest_class_mean():
  # Class means from train classify test well above chance: something to learn.
  x, y = data.synthetic_split("cifar10", "train", num_examples=500)
  xt, yt = data.synthetic_split("cifar10", "test", num_examples=200)
  x, xt = x.reshape(500, -1).astype(float), xt.reshape(200, -1).astype(float)
  means = np.stack([x[y == k].mean(0) for k in range(10)])
  pred = np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == yt).mean() > 0.9


# ------------------------------------------------------------------- TFDS


def _write_fake_tiny_imagenet(root: pathlib.Path) -> None:
  """A tiny-imagenet-200/ folder with 3 classes, 2 train and 1-2 val images each."""
  from PIL import Image

  rng = np.random.default_rng(0)
  base = root / "tiny-imagenet-200"
  wnids = ["n0300", "n0100", "n0200"]  # Not sorted: labels follow sorted order.
  (base / "val" / "images").mkdir(parents=True)
  base.joinpath("wnids.txt").write_text("\n".join(wnids) + "\n")
  for wnid in wnids:
    folder = base / "train" / wnid / "images"
    folder.mkdir(parents=True)
    for i in range(2):
      # Flat colours survive JPEG: the label can be read back from the pixels.
      img = np.full((64, 64, 3), 40 + 80 * sorted(wnids).index(wnid), np.uint8)
      Image.fromarray(img).save(folder / f"{wnid}_{i}.JPEG", quality=95)
  val = [("val_0.JPEG", "n0200"), ("val_1.JPEG", "n0100"), ("val_2.JPEG", "n0300")]
  lines = []
  for fname, wnid in val:
    level = 40 + 80 * sorted(wnids).index(wnid)
    if fname == "val_1.JPEG":  # Tiny ImageNet has a few grayscale JPEGs.
      Image.fromarray(np.full((64, 64), level, np.uint8)).save(base / "val" / "images" / fname)
    else:
      Image.fromarray(np.full((64, 64, 3), level, np.uint8)).save(base / "val" / "images" / fname)
    lines.append(f"{fname}\t{wnid}\t0\t0\t{rng.integers(10, 63)}\t63")
  base.joinpath("val", "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_builder_on_fake_folder(tmp_path):
  _write_fake_tiny_imagenet(tmp_path / "manual")
  kwargs = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
  images, labels = data.load_split("tiny_imagenet", "train", **kwargs)
  assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
  # Label k is the k-th wnid in sorted order; its images have level 40 + 80 k.
  np.testing.assert_allclose(images.reshape(6, -1).mean(1), 40 + 80 * labels, atol=2)
  test_images, test_labels = data.load_split("tiny_imagenet", "test", **kwargs)
  assert test_images.shape == (3, 64, 64, 3)
  assert sorted(test_labels.tolist()) == [0, 1, 2]
  np.testing.assert_allclose(test_images.reshape(3, -1).mean(1), 40 + 80 * test_labels, atol=2)
  # Prepared once: loads again without the raw folder.
  again, _ = data.load_split(
    "tiny_imagenet", "test", data_dir=kwargs["data_dir"], manual_dir=str(tmp_path / "nowhere")
  )
  assert again.shape == (3, 64, 64, 3)


@pytest.mark.parametrize(
  "name,expected",
  [
    (
      "mnist",
      [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
      ],
    ),
    ("cifar10", ["cifar-10-binary.tar.gz"]),
    ("cifar100", ["cifar-100-binary.tar.gz"]),
    ("tiny_imagenet", ["tiny-imagenet-200/"]),
  ],
)
def test_missing_offline_data_names_files_and_folder(tmp_path, name, expected):
  manual = tmp_path / "empty_manual"
  manual.mkdir()
  with pytest.raises(data.MissingDataError) as err:
    data.load_split(name, "train", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
  msg = str(err.value)
  assert str(manual) in msg and name in msg
  for fname in expected:
    assert fname in msg


def test_tiny_imagenet_without_manual_dir_fails_clearly(tmp_path, monkeypatch):
  monkeypatch.delenv(data.MANUAL_DIR_ENV, raising=False)
  with pytest.raises(data.MissingDataError, match="tiny-imagenet-200"):
    data.load_split("tiny_imagenet", "test", data_dir=str(tmp_path))


def test_manual_dir_env_var_is_used(tmp_path, monkeypatch):
  monkeypatch.setenv(data.MANUAL_DIR_ENV, str(tmp_path / "from_env"))
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data_env"))
  with pytest.raises(data.MissingDataError) as err:
    data.load_split("cifar10", "test")
  assert str(tmp_path / "from_env") in str(err.value)
  assert str(tmp_path / "data_env") in str(err.value)


@pytest.mark.slow
def test_real_mnist_prepared_offline(mnist_tfds):
  kwargs = mnist_tfds
  x, y = data.load_split("mnist", "train", **kwargs)
  xt, yt = data.load_split("mnist", "test", **kwargs)
  assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
  assert x.dtype == xt.dtype == np.uint8 and y.dtype == yt.dtype == np.int32
  assert y.shape == (60000,) and yt.shape == (10000,)
  assert set(np.unique(y)) == set(range(10)) and set(np.unique(yt)) == set(range(10))
  assert abs(x.mean() / 255.0 - 0.1307) < 1e-3
  assert abs(x.std() / 255.0 - 0.3081) < 1e-3


def test_corrupt_manual_file_reports_tfds_cause(tmp_path):
  # TFDS verifies the checksum of a manual file and never falls back to a download.
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "cifar-10-binary.tar.gz").write_bytes(b"not the real tarball")
  with pytest.raises(data.MissingDataError, match="(?i)checksum") as err:
    data.load_split("cifar10", "test", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert "cifar-10-binary.tar.gz" in str(err.value)
  assert err.value.__cause__ is not None
