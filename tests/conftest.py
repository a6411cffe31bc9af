"""Shared fixtures: real MNIST prepared offline by TFDS from the raw files beside the
checkout (../shared/data/mnist), once per test session."""

from __future__ import annotations

import pathlib

import pytest

from sparsejax import data

MNIST_RAW = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_tfds(tmp_path_factory) -> dict:
  """``load_split`` keyword arguments for real MNIST (data_dir, manual_dir); skips when the
  raw files are absent (a user's fresh clone has no offline copy; CI always has it)."""
  if not all((MNIST_RAW / f).exists() for f in data.get_spec("mnist").manual_files):
    pytest.skip(f"raw MNIST files not found in {MNIST_RAW} (only present beside the "
                "project's own checkout; a fresh clone has no offline copy)")
  return dict(data_dir=str(tmp_path_factory.mktemp("tfds_mnist")), manual_dir=str(MNIST_RAW))
