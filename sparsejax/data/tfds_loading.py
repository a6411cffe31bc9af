"""TFDS loading: a whole split into host memory, prepared offline from raw files.

The only part of :mod:`sparsejax.data` that imports TensorFlow Datasets (and so
TensorFlow): ``pip install "sparsejax[data]"``. :mod:`sparsejax.data` imports it on
first use of :func:`load_split` or :class:`TinyImagenetFolder`.

Offline preparation: TFDS prepares a dataset from the raw files it would download
when they are in ``manual_dir`` (``tfds.download.DownloadConfig(manual_dir=...)``).
Tiny ImageNet is not in the TFDS catalog; :class:`TinyImagenetFolder` reads the
official unzipped ``tiny-imagenet-200/`` folder.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from sparsejax.data.specs import (
  DATA_DIR_ENV,
  MANUAL_DIR_ENV,
  DatasetSpec,
  MissingDataError,
  _check_split,
  image_spec,
)


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
  spec = image_spec(name)
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
