"""Data loaders: real formats on files made here, and errors that name the file and the problem."""
import numpy as np
import pytest

from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.data import DataConfig, DataError, load_dataset, read_idx
from aeserve.training.trainer import train
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


def test_npy_npz_csv(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x_train=x[:40], x_test=x[40:], y_train=np.arange(40))
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    for source, name in (("npy", "x.npy"), ("csv", "x.csv")):
        data = load_dataset(DataConfig(source=source, path=str(tmp_path / name)))
        assert len(data.train_x) == 45 and len(data.test_x) == 5
        scaled = data.preprocessing.to_model(data.train_x)
        assert scaled.min() >= 0 and scaled.max() <= 1 + 1e-6
    data = load_dataset(DataConfig(source="npz", path=str(tmp_path / "x.npz")))
    np.testing.assert_array_equal(data.test_x, x[40:])
    np.testing.assert_array_equal(data.train_y, np.arange(40))


def test_ragged_csv(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,3\n4,5,6\n7,8\n")
    with pytest.raises(DataError, match=r"ragged.csv: line 3 has 2 values, earlier rows have 3 \(ragged rows\)"):
        load_dataset(DataConfig(source="csv", path=str(path)))


def test_non_numeric_csv(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("1,2\n3,abc\n")
    with pytest.raises(DataError, match=r"words.csv: line 2 holds a value that is not a number"):
        load_dataset(DataConfig(source="csv", path=str(path)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_values(tmp_path, bad):
    x = np.ones((10, 3), np.float32)
    x[7, 1] = bad
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(DataError, match=r"nan.npy: 1 row\(s\) hold NaN or infinite values, first at row 7"):
        load_dataset(DataConfig(source="npy", path=str(tmp_path / "nan.npy")))
    (tmp_path / "nan.csv").write_text("1,2\n3,nan\n")
    with pytest.raises(DataError, match=r"nan.csv: 1 row\(s\) hold NaN"):
        load_dataset(DataConfig(source="csv", path=str(tmp_path / "nan.csv")))


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy: not a readable .npy array"):
        load_dataset(DataConfig(source="npy", path=str(tmp_path / "obj.npy")))


def test_missing_path():
    with pytest.raises(DataError, match="data.source 'npy' needs data.path"):
        load_dataset(DataConfig(source="npy"))
    with pytest.raises(DataError, match="/no/such.csv: file not found"):
        load_dataset(DataConfig(source="csv", path="/no/such.csv"))


def test_bad_data_writes_no_registry_entry(tmp_path):
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    registry = Registry(tmp_path / "registry")
    config = build_run_config({"name": "x", "data": {"source": "csv", "path": str(tmp_path / "ragged.csv")}, "model": {"kind": "pca", "code_dim": 1}})
    with pytest.raises(DataError):
        train(config, registry, progress=False)
    assert registry.names() == [] and not (registry.root / "x").exists()


def test_unknown_source_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"data.source 'mnist' is not one of \['csv', 'digits', 'fashion-mnist', 'images', 'npy', 'npz', 'table'\]"):
        DataConfig(source="mnist")


def test_a_value_beyond_float32_names_its_row_and_column(tmp_path):
    x = np.ones((10, 3))
    x[6, 2] = 1e300
    np.save(tmp_path / "big.npy", x)
    with pytest.raises(DataError, match=r"big.npy: 1 row\(s\) hold NaN, infinite values or values beyond float32's range \(±3.4e\+38\), "
                                        r"first at row 6, column 2: 1e\+300$"):
        load_dataset(DataConfig(source="npy", path=str(tmp_path / "big.npy")))
    (tmp_path / "big.csv").write_text("1,2\n3,4\n-1e300,5\n")
    with pytest.raises(DataError, match=r"big.csv: 1 row\(s\) hold NaN, .* first at row 2, column 0: -1e\+300$"):
        load_dataset(DataConfig(source="csv", path=str(tmp_path / "big.csv")))


def test_rows_without_features_are_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((30, 0)))
    with pytest.raises(DataError, match=r"empty.npy: the rows have no features: shape \(30, 0\)"):
        load_dataset(DataConfig(source="npy", path=str(tmp_path / "empty.npy")))


def test_npz_labels_are_one_whole_number_per_row(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 3))
    np.savez(tmp_path / "short.npz", x=x, y=np.arange(10))
    with pytest.raises(DataError, match=r"short.npz: y has 10 label\(s\) for the 12 row\(s\) of x; expected one label per row, shape \(12,\)"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "short.npz")))
    np.savez(tmp_path / "split.npz", x_train=x, y_train=np.arange(12), x_test=x[:4], y_test=np.arange(5))
    with pytest.raises(DataError, match=r"split.npz: y_test has 5 label\(s\) for the 4 row\(s\) of x_test"):
        load_dataset(DataConfig(source="npz", path=str(tmp_path / "split.npz")))
    for y, row, shown in ((np.array(["cat"] * 12), 0, "'cat'"), (np.r_[np.arange(5.0), np.nan, np.arange(6.0)], 5, "nan"),
                          (np.r_[np.arange(8.0), 2.5, np.arange(3.0)], 8, "2.5")):
        np.savez(tmp_path / "bad.npz", x=x, y=y)
        with pytest.raises(DataError, match=rf"bad.npz: y row {row} holds {shown} \(.*\), which is not a whole number; labels must be integers"):
            load_dataset(DataConfig(source="npz", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "whole.npz", x=x, y=(np.arange(12.0) % 3)[:, None])  # whole floats in a column: class numbers
    data = load_dataset(DataConfig(source="npz", path=str(tmp_path / "whole.npz"), test_fraction=0))
    assert data.train_y.dtype == np.int64 and data.train_y.tolist() == (np.arange(12) % 3).tolist()
