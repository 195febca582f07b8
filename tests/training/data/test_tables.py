"""Tables: a header row, separators, quoting and a BOM read by pyarrow; the label kept apart; categories one-hot;
missing fields by policy; every data error names the file, the line as an editor shows it and the column. The csv
source (numbers only, no header) goes through the same reader."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aeserve.models.checkpoint import WEIGHTS
from aeserve.models.columns import date_parts
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.data.config import DataConfig
from aeserve.training.data.dataset import DataError
from aeserve.training.data.sources import load_dataset
from aeserve.training.trainer import train


def table_rows(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Two numeric features on very different scales, a category and a label."""
    rng = np.random.default_rng(seed)
    small = rng.normal(0.05, 0.01, n)
    large = rng.normal(2000.0, 400.0, n)
    colour = rng.choice(["red", "green", "blue"], n)
    label = (large > 2000).astype(int)
    return np.stack([small, large], axis=1), label, list(colour)


def write_csv(path, sep=",", bom=False, quote_numbers=False, blank=None):
    x, label, colour = table_rows()
    lines = [sep.join(["small", "large", "colour", "is_big"])]
    for i, (row, lab, c) in enumerate(zip(x, label, colour, strict=True)):
        small = f'"{float(row[0])!r}"' if quote_numbers else repr(float(row[0]))
        fields = [small, repr(float(row[1])), c, str(lab)]
        if blank is not None and i == blank[0]:
            fields[blank[1]] = blank[2]
        lines.append(sep.join(fields))
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n")
    return path


def config(path, **data) -> DataConfig:
    return DataConfig.from_dict({"source": "table", "path": str(path), "label": "is_big", "categorical": ["colour"], **data})


@pytest.mark.parametrize("sep,bom,quoted", [(",", False, False), (";", True, True), ("\t", False, False)])
def test_a_csv_with_a_header_reads_with_its_separator_bom_and_quotes(tmp_path, sep, bom, quoted):
    path = write_csv(tmp_path / ("rows.tsv" if sep == "\t" else "rows.csv"), sep=sep, bom=bom, quote_numbers=quoted)
    dataset = load_dataset(config(path))
    x, label, colour = table_rows()
    assert dataset.features == [{"name": "small", "type": "number"}, {"name": "large", "type": "number"},
                                {"name": "colour", "type": "category", "categories": ["blue", "green", "red"]}]
    rows = np.concatenate([dataset.train_x, dataset.test_x])
    assert rows.shape == (60, 5) and len(dataset.train_x) == 54  # 2 numbers + 3 one-hot columns; 10 % held out
    np.testing.assert_allclose(np.sort(rows[:, 1]), np.sort(x[:, 1]), rtol=1e-6)
    assert rows[:, 2:].sum(axis=1).tolist() == [1.0] * 60
    assert sorted(np.concatenate([dataset.train_y, dataset.test_y]).tolist()) == sorted(label.tolist())


def test_standard_scaling_is_fitted_per_feature_on_the_training_rows(tmp_path):
    dataset = load_dataset(config(write_csv(tmp_path / "rows.csv")))
    pre = dataset.preprocessing
    assert pre.scaling == "standard" and pre.per_feature
    scaled = pre.to_model(dataset.train_x)
    np.testing.assert_allclose(scaled[:, :2].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(scaled[:, :2].std(axis=0), 1, atol=1e-4)
    np.testing.assert_allclose(pre.from_model(scaled), dataset.train_x, rtol=1e-5, atol=1e-3)
    minmax = load_dataset(config(write_csv(tmp_path / "rows.csv"), scaling="minmax")).preprocessing.to_model(dataset.train_x)
    np.testing.assert_allclose([minmax.min(axis=0), minmax.max(axis=0)], [np.zeros(5), np.ones(5)], atol=1e-5)


@pytest.mark.parametrize("blank,missing,message", [
    ((6, 1, ""), "error", "rows.csv: line 8, column 'large': the field is empty or NA; set data.missing = 'drop' or 'median'"),
    ((6, 1, "NA"), "error", "rows.csv: line 8, column 'large': the field is empty or NA"),
    ((9, 0, "0.05,7"), "error", "rows.csv: line 11 has 5 fields, the header 4 (','-separated; quote a field that holds ',')"),
    ((3, 1, "1e999"), "error", "rows.csv: line 5, column 'large': the value is not finite"),
])
def test_bad_fields_name_the_file_the_line_and_the_column(tmp_path, blank, missing, message):
    path = write_csv(tmp_path / "rows.csv", blank=blank)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(config(path, missing=missing))


def test_a_decimal_comma_in_a_semicolon_file_names_its_line_and_column(tmp_path):
    path = write_csv(tmp_path / "rows.csv", sep=";", blank=(9, 0, "0,05"))
    with pytest.raises(DataError, match="rows.csv: line 11, column 'small': '0,05' is not a number; list the column in data.categorical"):
        load_dataset(config(path))


def test_missing_fields_are_dropped_or_filled_with_the_median(tmp_path):
    path = write_csv(tmp_path / "rows.csv", blank=(6, 1, "NA"))
    dropped = load_dataset(config(path, missing="drop"))
    assert len(dropped.train_x) + len(dropped.test_x) == 59
    filled = load_dataset(config(path, missing="median"))
    rows = np.concatenate([filled.train_x, filled.test_x])
    x, _, _ = table_rows()
    assert len(rows) == 60 and np.isclose(rows[:, 1], np.median(np.delete(x[:, 1], 6)), rtol=1e-6).sum() >= 1


def test_columns_exclude_and_unknown_names(tmp_path):
    path = write_csv(tmp_path / "rows.csv")
    only = load_dataset(config(path, columns=["large"], categorical=[]))
    assert only.features == [{"name": "large", "type": "number"}] and only.train_x.shape[1] == 1
    without = load_dataset(config(path, exclude=["small"]))
    assert [f["name"] for f in without.features] == ["large", "colour"]
    with pytest.raises(DataError, match=r"no column\(s\) \['price'\]; the header names \['small', 'large', 'colour', 'is_big'\]"):
        load_dataset(config(path, label="price"))


def test_parquet_reads_as_the_csv_does(tmp_path):
    csv_data = load_dataset(config(write_csv(tmp_path / "rows.csv")))
    x, label, colour = table_rows()
    pq.write_table(pa.table({"small": x[:, 0], "large": x[:, 1], "colour": colour, "is_big": label}), tmp_path / "rows.parquet")
    parquet = load_dataset(config(tmp_path / "rows.parquet"))
    np.testing.assert_allclose(parquet.train_x, csv_data.train_x, rtol=1e-6)
    assert parquet.features == csv_data.features


def test_standard_scaling_gets_a_linear_output_and_logistic_kinds_are_refused(tmp_path):
    base = {"name": "t", "data": {"source": "table", "path": "x.csv"}}
    assert build_run_config({**base, "model": {"kind": "mlp", "code_dim": 2}}).model["output"] == "linear"
    with pytest.raises(ValueError, match="model.output 'sigmoid' reconstructs values in \\[0, 1\\], but data.scaling 'standard'"):
        build_run_config({**base, "model": {"kind": "mlp", "code_dim": 2, "output": "sigmoid"}})
    with pytest.raises(ValueError, match="model.kind 'vae' reconstructs values in \\[0, 1\\]"):
        build_run_config({**base, "model": {"kind": "vae", "code_dim": 2}})
    minmax = {"name": "t", "data": {"source": "table", "path": "x.csv", "scaling": "minmax"}, "model": {"kind": "mlp", "code_dim": 2}}
    assert "output" not in build_run_config(minmax).model  # the MLP's own default, sigmoid, suits [0, 1]


def test_a_table_version_stores_its_scaling_and_features_and_serves_in_the_datas_units(tmp_path):
    path = write_csv(tmp_path / "rows.csv")
    registry = Registry(tmp_path / "registry")
    run = build_run_config({"name": "rows", "data": {"source": "table", "path": str(path), "label": "is_big", "categorical": ["colour"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 3, "batch_size": 16, "report": False}})
    train(run, registry, progress=False)
    manifest = registry.manifest("rows")
    assert manifest["preprocessing"] == {"input_shape": [5], "scaling": "standard", "per_feature": True}
    assert [f["name"] for f in manifest["features"]] == ["small", "large", "colour"] and manifest["config"]["output"] == "linear"
    assert "is_big" not in json.dumps(manifest["features"])
    version = registry.load("rows")
    dataset = load_dataset(run.data)
    np.testing.assert_array_equal(version.preprocessing.offset, dataset.preprocessing.offset)
    np.testing.assert_array_equal(version.preprocessing.scale, dataset.preprocessing.scale)
    x_hat, errors, _ = version.reconstruct(dataset.test_x)
    scaled_errors = ((version.preprocessing.to_model(x_hat) - version.preprocessing.to_model(dataset.test_x)) ** 2).sum(axis=1)
    np.testing.assert_allclose(errors, scaled_errors, rtol=1e-4)  # errors in the scaled space
    assert abs(float(np.median(x_hat[:, 1])) - 2000) < 800  # reconstructions in the data's own units
    # The vectors live in the weights file, checked like every tensor.
    from safetensors.numpy import load_file
    tensors = load_file(registry.version_dir("rows", 1) / WEIGHTS)
    assert tensors["preprocessing.scale"].shape == (5,) and tensors["preprocessing.offset"].dtype == np.float32


def test_a_folder_given_as_the_table_says_it_is_a_directory(tmp_path):
    with pytest.raises(DataError, match=r"is a directory; data.source 'table' needs a file"):
        load_dataset(config(tmp_path))


def by_large(rows):
    """Rows in the order of the 'large' column (all distinct): the same rows whatever the split."""
    return rows[np.argsort(rows[:, 1], kind="stable")]


def test_parquet_is_read_by_row_groups_and_gives_the_features_of_the_whole_table(tmp_path, monkeypatch):
    x, label, colour = table_rows(n=600)
    table = pa.table({"small": x[:, 0], "large": x[:, 1], "colour": colour, "is_big": label, "id": np.arange(600)})
    pq.write_table(table, tmp_path / "groups.parquet", row_group_size=64)
    pq.write_table(table, tmp_path / "one.parquet")
    assert pq.ParquetFile(tmp_path / "groups.parquet").num_row_groups == 10
    groups_read, read_row_group = [], pq.ParquetFile.read_row_group

    def counted(self, group, **kwargs):
        groups_read.append((group, kwargs["columns"]))
        return read_row_group(self, group, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    monkeypatch.setattr(pq, "read_table", None)  # never the whole table at once
    groups = load_dataset(config(tmp_path / "groups.parquet", exclude=["id"]))
    assert groups_read == [(g, ["small", "large", "colour", "is_big"]) for g in range(10)]  # only the columns used
    one = load_dataset(config(tmp_path / "one.parquet", exclude=["id"]))
    for a, b in ((groups.train_x, one.train_x), (groups.test_x, one.test_x), (groups.train_y, one.train_y)):
        np.testing.assert_array_equal(a, b)
    assert groups.features == one.features and groups.fingerprint == one.fingerprint
    # The features: the numbers as float32 and the colour one-hot over its sorted categories.
    expected = np.concatenate([x.astype(np.float32), (np.asarray(colour)[:, None] == np.array(["blue", "green", "red"])).astype(np.float32)], axis=1)
    np.testing.assert_array_equal(by_large(np.concatenate([groups.train_x, groups.test_x])), by_large(expected))
    run = build_run_config({"name": "groups", "data": {"source": "table", "path": str(tmp_path / "groups.parquet"), "label": "is_big",
                                                       "categorical": ["colour"], "exclude": ["id"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [8]}, "train": {"epochs": 2, "batch_size": 64, "report": False}})
    registry = Registry(tmp_path / "registry")
    assert train(run, registry, progress=False) == 1
    assert registry.manifest("groups")["training"]["data_fingerprint"] == one.fingerprint


def test_a_csv_is_read_block_by_block_with_line_numbers_counted_across_blocks(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "rows.csv")
    whole = load_dataset(config(path))
    monkeypatch.setattr("aeserve.training.data.tables.CSV_BLOCK_BYTES", 256)  # about six rows a block
    blocks = load_dataset(config(path))
    np.testing.assert_array_equal(blocks.train_x, whole.train_x)
    np.testing.assert_array_equal(blocks.test_y, whole.test_y)
    # A column that reads as integers in the first blocks and holds text later: one type for the whole file.
    lines = path.read_text().splitlines()
    lines[1:] = [f"{i},{i * 10},red,0" for i in range(40)] + ["0.5,2.5,blue,1", "x,3,red,0"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="rows.csv: line 43, column 'small': 'x' is not a number"):
        load_dataset(config(path))
    path.write_text("\n".join(lines[:-1]) + "\n")
    assert np.concatenate([load_dataset(config(path)).train_x, load_dataset(config(path)).test_x])[:, 0].max() == 39


@pytest.mark.parametrize("header,column,places", [("a,a,is_big", "a", "1, 2"), ("a,b,is_big,is_big", "is_big", "3, 4")])
def test_a_column_named_twice_in_the_header_is_refused(tmp_path, header, column, places):
    fields = header.count(",") + 1
    (tmp_path / "twice.csv").write_text("\n".join([header] + [",".join([str(i % 2)] * fields) for i in range(6)]) + "\n")
    with pytest.raises(DataError, match=f"^.*twice.csv: the header names column '{column}' 2 times \\(columns {places}\\); give each column its own name$"):
        load_dataset(config(tmp_path / "twice.csv", categorical=[]))
    if column == "a":
        pq.write_table(pa.Table.from_arrays([pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([0, 1])], names=header.split(",")),
                       tmp_path / "twice.parquet")
        with pytest.raises(DataError, match=r"twice.parquet: the schema names column 'a' 2 times \(columns 1, 2\)"):
            load_dataset(config(tmp_path / "twice.parquet", categorical=[]))


@pytest.mark.parametrize("key", ["columns", "exclude", "categorical"])
def test_a_column_listed_twice_in_the_config_is_refused(key):
    with pytest.raises(ValueError, match=rf"^data.{key} names 'small' more than once, got \['small', 'large', 'small'\]$"):
        DataConfig.from_dict({"source": "table", "path": "rows.csv", key: ["small", "large", "small"]})


@pytest.mark.parametrize("missing", ["error", "median"])
def test_a_value_beyond_float32_names_its_line_and_column(tmp_path, missing):
    path = write_csv(tmp_path / "rows.csv", blank=(3, 1, "1e300"))
    with pytest.raises(DataError, match=r"rows.csv: line 5, column 'large': 1e\+300 is beyond float32's range \(±3.4e\+38\)$"):
        load_dataset(config(path, missing=missing))
    x, label, colour = table_rows()
    large = x[:, 1].copy()
    large[7] = -1e300
    pq.write_table(pa.table({"small": x[:, 0], "large": large, "colour": colour, "is_big": label}), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet: row 8, column 'large': -1e\+300 is beyond float32's range"):
        load_dataset(config(tmp_path / "rows.parquet", missing=missing))


@pytest.mark.parametrize("values,type_name", [([[1.0, 2.0], [3.0]], "list<element: double>"), ([{"p": 1}, {"p": 2}], "struct<p: int64>")])
def test_a_parquet_column_of_lists_or_structs_names_the_column(tmp_path, values, type_name):
    pq.write_table(pa.table({"small": [0.1, 0.2], "nested": values, "is_big": [0, 1]}), tmp_path / "nested.parquet")
    with pytest.raises(DataError, match=rf"nested.parquet: column 'nested' holds {type_name.replace('<', '.').replace('>', '.')} values "
                                        r"\(lists, structs or maps\); a table's columns must hold numbers or text: leave it out with data.exclude"):
        load_dataset(config(tmp_path / "nested.parquet", categorical=[]))
    assert load_dataset(config(tmp_path / "nested.parquet", categorical=[], exclude=["nested"], test_fraction=0)).train_x.shape == (2, 1)


def test_a_file_named_parquet_that_is_not_parquet_names_the_file(tmp_path):
    write_csv(tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"^.*rows.parquet: not a readable Parquet file \(Parquet magic bytes not found"):
        load_dataset(config(tmp_path / "rows.parquet"))


def test_text_that_is_not_utf8_names_the_line_and_column(tmp_path):
    path = write_csv(tmp_path / "rows.csv")
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace("red", "ros\xe9").replace("green", "ros\xe9").replace("blue", "ros\xe9")
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError, match=r"rows.csv: line 5, column 'colour': the text b'ros\\xe9' is not UTF-8; save the file as UTF-8$"):
        load_dataset(config(path))
    path.write_bytes("\n".join(["sm\xe4ll,large,colour,is_big", *lines[1:]]).encode("latin-1"))
    with pytest.raises(DataError, match=r"rows.csv: line 1 is not UTF-8 text \(byte 3: b'\\xe4'\); save the file as UTF-8$"):
        load_dataset(config(path))


# --- the csv source: numbers only, no header --------------------------------------------

def csv_source(path, **data) -> DataConfig:
    return DataConfig.from_dict({"source": "csv", "path": str(path), **data})


def test_a_csv_of_numbers_reads_quotes_spaces_and_blank_lines_as_plain_numbers(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('1, 2,3\n\n"4",5 ,6e0\n7,8,-9.5\n')
    data = load_dataset(csv_source(path, test_fraction=0, scaling="minmax"))
    assert data.train_x.dtype == np.float32 and data.preprocessing.input_shape == (3,)
    np.testing.assert_array_equal(data.train_x[np.argsort(data.train_x[:, 0])], [[1, 2, 3], [4, 5, 6], [7, 8, -9.5]])


def test_a_ragged_csv_names_the_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("1,2,3\n4,5,6\n7,8\n")
    with pytest.raises(DataError, match=r"ragged.csv: line 3 has 2 values, earlier rows have 3 \(ragged rows\)"):
        load_dataset(csv_source(path))


@pytest.mark.parametrize("text,line,shown", [("1,2\n3,abc\n", 2, "'abc'"), ("1,2\n\n3,4\n5,\n", 4, "''"), ("1,2\n3,NA\n", 2, "'NA'")])
def test_a_field_that_is_not_a_number_names_its_line_and_place(tmp_path, text, line, shown):
    (tmp_path / "words.csv").write_text(text)
    with pytest.raises(DataError, match=rf'^.*words.csv: line {line}, field 2: {shown} is not a number; data.source "csv" takes numbers only'):
        load_dataset(csv_source(tmp_path / "words.csv"))


def test_a_csv_of_numbers_is_read_block_by_block_with_lines_counted_across_blocks(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(200, 4))
    path = tmp_path / "x.csv"
    np.savetxt(path, x, delimiter=",")
    whole = load_dataset(csv_source(path))
    monkeypatch.setattr("aeserve.training.data.tables.CSV_BLOCK_BYTES", 256)  # a few rows a block
    blocks = load_dataset(csv_source(path))
    np.testing.assert_array_equal(blocks.train_x, whole.train_x)
    np.testing.assert_allclose(np.sort(np.concatenate([blocks.train_x, blocks.test_x]), axis=0), np.sort(x, axis=0).astype(np.float32))
    lines = path.read_text().splitlines()
    lines[149] = lines[149].replace(",", ",x", 1)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"x.csv: line 150, field 2: 'x.*' is not a number"):
        load_dataset(csv_source(path))


def test_csv_text_that_is_not_utf8_names_the_line_and_field(tmp_path):
    (tmp_path / "bytes.csv").write_bytes(b"1,2\n3,4\xff\n")
    with pytest.raises(DataError, match=r"bytes.csv: line 2, field 2: the text b'4\\xff' is not UTF-8; save the file as UTF-8$"):
        load_dataset(csv_source(tmp_path / "bytes.csv"))


PENGUIN_COLUMNS = ["rowid", "species", "island", "bill_length_mm", "body_mass_g", "sex", "year", "observed", "Name", "comment"]


def penguins_rows(n: int = 120, seed: int = 0) -> list[list[str]]:
    """A table like palmerpenguins, as text fields: a row number, the label, two text columns with few values, numbers
    with empty and NA fields, a year, a date, a name per row and a comment of free text."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        year = int(rng.choice([2007, 2008, 2009]))
        rows.append([str(i + 1), str(rng.choice(["Adelie", "Gentoo", "Chinstrap"])), str(rng.choice(["Biscoe", "Dream", "Torgersen"])),
                     str(round(float(rng.normal(44, 5)), 1)), str(round(float(rng.normal(4200, 800)))), str(rng.choice(["male", "female"])),
                     str(year), f"{year}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}", f"bird-{i:04d}",
                     f'"seen near the {["north", "south", "east"][i % 3]} shore at dawn, {i} minutes in"'])
        if i % 17 == 3:
            rows[-1][3] = ""
        if i % 23 == 5:
            rows[-1][4] = "NA"
        if i % 11 == 7:
            rows[-1][5] = "NA"
        if i % 40 == 9:
            rows[-1][7] = ""
    return rows


def write_penguins(path, n: int = 120):
    path.write_text("\n".join(",".join(row) for row in [PENGUIN_COLUMNS, *penguins_rows(n)]) + "\n")
    return path


def penguin_column(name: str, rows: list[list[str]]) -> list[str]:
    return [row[PENGUIN_COLUMNS.index(name)] for row in rows]


def test_the_column_kinds_of_a_table_are_inferred_with_the_reasons_for_what_is_left_out(tmp_path):
    from aeserve.training.data.inference import infer_columns

    keys, record = infer_columns(DataConfig(source="table", path=str(write_penguins(tmp_path / "penguins.csv")), label="species"))
    assert keys == {"exclude": ["rowid", "Name", "comment"], "categorical": ["island", "sex"], "dates": ["observed"]}
    assert record == {
        "categorical": ["island", "sex"], "dates": ["observed"],
        "excluded": {"rowid": "identifier-like: whole numbers counting up by one, row after row, to 120",
                     "Name": "identifier-like: each of its 120 filled fields is a different text; list it in data.categorical to one-hot it anyway",
                     "comment": "free text: 120 different texts in 120 filled fields, most of several words; list it in data.categorical "
                                "to one-hot it anyway"},
        "empty_fields": {"bill_length_mm": 7, "body_mass_g": 5, "sex": 11, "observed": 3}}
    # Columns the config names are read as it says; only the others are inferred.
    keys, record = infer_columns(DataConfig(source="table", path=str(tmp_path / "penguins.csv"), label="species", exclude=("island",),
                                            categorical=("Name",), columns=("island", "sex", "Name", "comment", "year")))
    assert keys == {"exclude": ["island", "comment"], "categorical": ["Name", "sex"], "dates": [], "columns": ["island", "sex", "Name", "year"]}
    assert list(record["excluded"]) == ["comment"]


def test_parquet_dates_and_booleans_are_inferred_by_their_types(tmp_path):
    import datetime

    from aeserve.training.data.inference import infer_columns

    days = [datetime.date(2007, 1, 1) + datetime.timedelta(days=37 * i) for i in range(30)]
    pq.write_table(pa.table({"when": days, "stamp": [datetime.datetime(2020, 5, 17, 13, i) for i in range(30)],
                             "ok": [i % 3 == 0 for i in range(30)], "size": [float(i % 7) for i in range(30)]}), tmp_path / "t.parquet")
    keys, _ = infer_columns(DataConfig(source="table", path=str(tmp_path / "t.parquet")))
    assert keys == {"exclude": [], "categorical": ["ok"], "dates": ["when", "stamp"]}
    dataset = load_dataset(DataConfig(source="table", path=str(tmp_path / "t.parquet"), test_fraction=0.0, **keys))
    rows = dataset.train_x[np.lexsort((dataset.train_x[:, 1], dataset.train_x[:, 0]))]  # by year, then day
    assert dataset.features[:2] == [{"name": "when", "type": "date"}, {"name": "stamp", "type": "date"}]
    np.testing.assert_array_equal(rows[:3, :4], [[2007, 1, 2020, 138], [2007, 38, 2020, 138], [2007, 75, 2020, 138]])


def test_missing_fields_filled_with_the_median_get_an_indicator_and_a_category_its_own_slot(tmp_path):
    path = write_penguins(tmp_path / "penguins.csv")
    data = DataConfig(source="table", path=str(path), label="species", exclude=("rowid", "Name", "comment"),
                      categorical=("island", "sex"), dates=("observed",), missing="median")
    dataset = load_dataset(data)
    rows = penguins_rows()
    bill = np.array([float(v) if v else np.nan for v in penguin_column("bill_length_mm", rows)])
    observed = [date_parts(v) for v in penguin_column("observed", rows) if v]
    islands = penguin_column("island", rows)
    assert dataset.features == [
        {"name": "island", "type": "category", "categories": ["Biscoe", "Dream", "Torgersen"], "fill": max(sorted(set(islands)), key=islands.count)},
        {"name": "bill_length_mm", "type": "number", "fill": float(np.median(bill[~np.isnan(bill)])), "indicator": True},
        {"name": "body_mass_g", "type": "number", "fill": dataset.features[2]["fill"], "indicator": True},
        {"name": "sex", "type": "category", "categories": ["female", "male"], "indicator": True},
        {"name": "year", "type": "number", "fill": 2008.0},
        {"name": "observed", "type": "date", "fill": [float(np.median([y for y, _ in observed])), float(np.median([d for _, d in observed]))],
         "indicator": True}]
    x = np.concatenate([dataset.train_x, dataset.test_x])
    assert x.shape == (120, 3 + 2 + 2 + 3 + 1 + 3)  # no row dropped: the label is never empty
    assert x[:, 4].sum() == 7 and x[:, 9].sum() == 11 and x[:, 13].sum() == 3  # the indicators and the sex's missing slot
    assert (x[:, 7:10].sum(axis=1) == 1).all()  # female, male or missing: one of the three
    np.testing.assert_array_equal(x[x[:, 4] == 1, 3], np.float32(dataset.features[1]["fill"]))
    np.testing.assert_array_equal(x[x[:, 13] == 1, 11:13], np.float32([dataset.features[5]["fill"]] * 3))
    assert "dropped_rows" not in dataset.facts and dataset.facts["table_columns"] == PENGUIN_COLUMNS


def test_rows_with_an_empty_label_are_counted_where_they_are_dropped(tmp_path):
    rows = penguins_rows(40)
    rows[5][1] = rows[9][1] = ""
    (tmp_path / "p.csv").write_text("\n".join(",".join(row) for row in [PENGUIN_COLUMNS, *rows]) + "\n")
    base = {"source": "table", "path": str(tmp_path / "p.csv"), "label": "species", "exclude": ("rowid", "Name", "comment", "observed"),
            "categorical": ("island", "sex")}
    assert load_dataset(DataConfig(**base, missing="median")).facts["dropped_rows"] == {"rows": 2, "why": "an empty or NA label ('species')"}
    dropped = load_dataset(DataConfig(**base, missing="drop"))
    assert dropped.facts["dropped_rows"]["rows"] == 40 - len(dropped.train_x) - len(dropped.test_x) > 2


def test_a_date_column_reads_iso_dates_and_names_a_field_that_is_not_one(tmp_path):
    (tmp_path / "d.csv").write_text("Year,mpg\n1970-01-01,18\n1971-03-01T08:30:00Z,15\n1972-12-31 23:59,16\n1973-02-30,17\n")
    data = {"source": "table", "path": str(tmp_path / "d.csv"), "dates": ("Year",), "test_fraction": 0.0}
    with pytest.raises(DataError, match=r"d.csv: line 5, column 'Year': '1973-02-30' is not a date \(YYYY-MM-DD, as data.dates reads\)"):
        load_dataset(DataConfig(**data))
    (tmp_path / "d.csv").write_text("Year,mpg\n1970-01-01,18\n1971-03-01T08:30:00Z,15\n1972-12-31 23:59,16\n")
    x = load_dataset(DataConfig(**data)).train_x
    np.testing.assert_array_equal(x[np.argsort(x[:, 0])], [[1970, 1, 18], [1971, 60, 15], [1972, 366, 16]])
    with pytest.raises(ValueError, match="data.dates and data.categorical both name 'Year'"):
        DataConfig(**data, categorical=("Year",))


def test_a_config_that_says_missing_error_keeps_its_strict_error(tmp_path):
    path = write_penguins(tmp_path / "penguins.csv")
    data = DataConfig(source="table", path=str(path), label="species", exclude=("rowid", "Name", "comment"), categorical=("island", "sex"),
                      dates=("observed",), missing="error")
    with pytest.raises(DataError, match=r"penguins.csv: line 5, column 'bill_length_mm': the field is empty or NA; set data.missing = 'drop' or 'median'"):
        load_dataset(data)
    with pytest.raises(DataError, match=r"penguins.csv: line 2, column 'island': 'Dream' is not a number; list the column in data.categorical"):
        load_dataset(DataConfig(source="table", path=str(path), label="species", missing="median", exclude=("rowid", "Name", "comment")))


def test_a_column_of_numbers_that_turns_to_text_in_a_later_block_counts_every_distinct_value(tmp_path, monkeypatch):
    from aeserve.training.data.inference import infer_columns

    monkeypatch.setattr("aeserve.training.data.tables.CSV_BLOCK_BYTES", 64)  # a few rows a block
    lines = ["grade,size"] + [f"{i % 3},{i * 0.5}" for i in range(60)] + ["unknown,1.5", "unknown,2.5"]
    (tmp_path / "g.csv").write_text("\n".join(lines) + "\n")
    keys, _ = infer_columns(DataConfig(source="table", path=str(tmp_path / "g.csv")))
    assert keys == {"exclude": [], "categorical": ["grade"], "dates": []}
    dataset = load_dataset(DataConfig(source="table", path=str(tmp_path / "g.csv"), missing="median", **keys))
    assert dataset.features[0] == {"name": "grade", "type": "category", "categories": ["0", "1", "2", "unknown"], "fill": "0"}
