"""The user's own arrays (.npy, .npz, and a CSV of numbers): real files made here, and errors that name the file and
the problem."""
import numpy as np
import pytest

from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.sources import load_dataset


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
