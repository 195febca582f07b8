"""A table's columns: the one mapping of read values to the rows a version takes (training, serving and encode)."""
import numpy as np
import pytest

from aeserve.models.columns import Columns, MissingRefused, date_values

FEATURES = [{"name": "size", "type": "number", "fill": 2.5, "indicator": True},
            {"name": "colour", "type": "category", "categories": ["blue", "red"], "fill": "red"},
            {"name": "shape", "type": "category", "categories": ["box", "tube"], "indicator": True},
            {"name": "day", "type": "date", "fill": [2000.0, 61.0]},
            {"name": "weight", "type": "number"}]


def test_values_become_rows_with_one_hots_fills_and_indicators():
    columns = Columns(FEATURES)
    assert columns.width == 2 + 2 + 3 + 2 + 1
    assert [(s.start, s.stop) for s in columns.slices] == [(0, 2), (2, 4), (4, 7), (7, 9), (9, 10)]
    missing = np.array([False, True])
    out = columns.encode([np.array([1.0, np.nan]), np.array([0, -1]), np.array([1, -1]),
                          np.array([[1970.0, 2.0], [np.nan, np.nan]]), np.array([7.0, 8.0])],
                         [missing, missing, missing, missing, None])
    assert out.dtype == np.float32
    assert out.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1970.0, 2.0, 7.0],
                            [2.5, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 2000.0, 61.0, 8.0]]


def test_a_missing_field_of_a_column_that_fills_none_is_refused_at_its_row():
    columns = Columns(FEATURES)
    gaps = np.array([False, False, True])
    assert columns.refused(4, gaps) == 2 and columns.refused(0, gaps) is None and columns.refused(4, None) is None
    with pytest.raises(MissingRefused) as refused:
        columns.encode([np.zeros(3), np.zeros(3, int), np.zeros(3, int), np.zeros((3, 2)), np.zeros(3)], [None, None, None, None, gaps])
    assert (refused.value.row, refused.value.name) == (2, "weight")


def test_a_float64_beyond_float32_becomes_infinite_for_the_reader_to_name():
    out = Columns([{"name": "x", "type": "number"}]).encode([np.array([1e300, 1.0])], [None])
    assert np.isinf(out[0, 0]) and out[1, 0] == 1.0


def test_date_values_read_iso_text_and_mark_what_is_not_a_date():
    parts, bad = date_values(["1970-03-02", None, "1970-13-01", 19700302, "2024-12-31T10:00:00Z", "1970-03-02"])
    assert bad.tolist() == [False, False, True, True, False, False]
    np.testing.assert_array_equal(parts[[0, 4, 5]], [[1970, 61], [2024, 366], [1970, 61]])
    assert np.isnan(parts[[1, 2, 3]]).all()
