"""The built-in data sets: Fashion-MNIST's IDX files (made here) and scikit-learn's digits."""
import numpy as np
import pytest

from aeserve.training.data.builtin import read_idx
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.sources import load_dataset
from tests.conftest import write_idx


def test_fashion_mnist_idx_files(fmnist_dir):
    data = load_dataset(DataConfig(source="fashion-mnist", path=str(fmnist_dir)))
    assert data.train_x.shape == (200, 28, 28) and data.test_x.shape == (50, 28, 28)
    assert data.train_y.shape == (200,) and data.test_y.dtype == np.int64
    assert data.preprocessing.input_shape == (28, 28) and data.preprocessing.scale == pytest.approx(1 / 255)
    x = data.preprocessing.to_model(data.train_x)
    assert x.shape == (200, 784) and 0 <= x.min() and x.max() <= 1


def test_uncompressed_idx_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", a, compress=False)), a)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", a, compress=True)), a)


def test_wrong_magic_number(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(100))
    with pytest.raises(DataError, match=r"bad-idx: wrong IDX magic number 12340803"):
        read_idx(path)


def test_truncated_idx(tmp_path):
    path = write_idx(tmp_path / "t", np.zeros((10, 4, 4), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"t: truncated or oversized IDX data: header says shape \(10, 4, 4\) \(160 bytes\), file has 155"):
        read_idx(path)


def test_missing_fashion_mnist_file(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: file not found"):
        load_dataset(DataConfig(source="fashion-mnist", path=str(tmp_path)))


def test_digits():
    data = load_dataset(DataConfig(source="digits"))
    assert data.train_x.shape[1:] == (8, 8) and len(data.train_x) + len(data.test_x) == 1797
    assert len(data.test_x) == 180  # test_fraction 0.1, seeded
