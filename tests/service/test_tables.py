"""A table version, its scaling one offset and scale per feature, served by every engine in the data's own units."""
import numpy as np
import pytest

from aeserve.models.columns import MISSING_TEXTS
from aeserve.models.outputs import OUTPUTS, Call
from aeserve.models.registry import Registry
from aeserve.training.config import build_run_config
from aeserve.training.trainer import train
from tests.servers import make_client, wait_ready
from tests.training.data.test_tables import write_csv

EVERYTHING = Call("inputs", tuple(OUTPUTS))


@pytest.fixture(scope="module")
def table_registry(tmp_path_factory) -> Registry:
    folder = tmp_path_factory.mktemp("tables")
    registry = Registry(folder / "registry")
    run = build_run_config({"name": "rows", "data": {"source": "table", "path": str(write_csv(folder / "rows.csv")), "label": "is_big",
                                                     "categorical": ["colour"]},
                            "model": {"kind": "mlp", "code_dim": 2, "hidden": [16]}, "train": {"epochs": 3, "batch_size": 16, "report": False}})
    train(run, registry, progress=False)
    return registry


def rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    colour = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]
    return np.concatenate([rng.normal(0.05, 0.01, (n, 1)), rng.normal(2000, 400, (n, 1)), colour], axis=1).astype(np.float32)


def test_an_npy_body_holds_the_rows_as_the_model_takes_them(table_registry):
    import io

    version = table_registry.load("rows")
    x = rows(4)
    body = io.BytesIO()
    np.save(body, x)
    with make_client(table_registry) as client:
        wait_ready(client.get)
        answer = client.post("/v1/models/rows/reconstruct", content=body.getvalue(), headers={"Content-Type": "application/x-npy"}).json()
        manifest = client.get("/v1/models/rows").json()
    x_hat, errors, percentiles = version.reconstruct(x)
    np.testing.assert_allclose(answer["errors"], errors, rtol=1e-5)
    np.testing.assert_allclose(answer["percentiles"], percentiles, rtol=1e-5)
    assert [row[2] for row in answer["outputs"]] == [["blue", "green", "red"][k] for k in np.argmax(x_hat[:, 2:], axis=1)]
    np.testing.assert_allclose([row[1] for row in answer["outputs"]], x_hat[:, 1], rtol=1e-5)
    assert [f["name"] for f in manifest["features"]] == ["small", "large", "colour"]
    assert manifest["preprocessing"]["scaling"] == "standard"


@pytest.mark.slow
def test_onnx_runtime_and_the_exported_models_scale_each_feature_as_torch_does(table_registry, tmp_path):
    import onnxruntime as ort

    from aeserve.cli import main
    from aeserve.service.runtime.export import export_checked
    from aeserve.service.runtime.onnx import OnnxVersion

    version = table_registry.load("rows")
    graphs, _, refused = export_checked(version.folder)
    assert refused is None
    engine, x = OnnxVersion(graphs, version.preprocessing, version.anomaly), rows(6)
    for got, want in zip(engine.run(EVERYTHING, x), version.run(EVERYTHING, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert main(["export", "rows:1", "--format", "onnx", "--out", str(tmp_path), "--registry", str(table_registry.root)]) == 0
    codes = ort.InferenceSession(str(tmp_path / "encoder.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(codes, version.encode(x), rtol=1e-4, atol=1e-4)
    decoded = ort.InferenceSession(str(tmp_path / "decoder.onnx")).run(None, {"code": codes})[0]
    np.testing.assert_allclose(decoded, version.decode(codes), rtol=1e-4, atol=1e-2)


def test_object_rows_get_object_answers_with_feature_errors(table_registry):
    version = table_registry.load("rows")
    objects = [{"small": 0.05, "large": 2100.0, "colour": "red"}, {"colour": "blue", "large": 1500.0, "small": 0.07}]
    encoded = np.array([[0.05, 2100.0, 0, 0, 1], [0.07, 1500.0, 1, 0, 0]], np.float32)  # blue, green, red
    with make_client(table_registry) as client:
        wait_ready(client.get)
        answer = client.post("/v1/models/rows/reconstruct", json={"inputs": objects}).json()
        as_arrays = client.post("/v1/models/rows/reconstruct", json={"inputs": [[0.05, 2100.0, "red"], [0.07, 1500.0, "blue"]]}).json()
        codes = client.post("/v1/models/rows/encode", json={"inputs": objects}).json()["outputs"]
        decoded = client.post("/v1/models/rows/decode", json={"inputs": codes}).json()["outputs"]
    x_hat, errors, _ = version.reconstruct(encoded)
    scaled = version.preprocessing
    per_value = (scaled.to_model(x_hat) - scaled.to_model(encoded)) ** 2
    assert [sorted(row) for row in answer["outputs"]] == [["colour", "large", "small"]] * 2
    for row, want in zip(answer["outputs"], x_hat, strict=True):
        assert row["colour"] == ["blue", "green", "red"][int(np.argmax(want[2:]))]
        assert row["large"] == pytest.approx(float(want[1]), rel=1e-5) and row["small"] == pytest.approx(float(want[0]), rel=1e-4, abs=1e-6)
    for row, want in zip(answer["feature_errors"], per_value, strict=True):
        assert row["small"] == pytest.approx(float(want[0]), rel=1e-4, abs=1e-6)
        assert row["colour"] == pytest.approx(float(want[2:].sum()), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(answer["errors"], errors, rtol=1e-4)
    assert as_arrays["outputs"] == [[row["small"], row["large"], row["colour"]] for row in answer["outputs"]]
    assert as_arrays["feature_errors"] == [[row["small"], row["large"], row["colour"]] for row in answer["feature_errors"]]
    np.testing.assert_allclose(codes, version.encode(encoded), rtol=1e-5, atol=1e-5)
    assert all(len(row) == 3 and row[2] in ("blue", "green", "red") for row in decoded)


@pytest.mark.parametrize("rows,message", [
    ([{"small": 0.05, "large": 2000.0}], "row 0: column(s) ['colour'] missing (this version was trained with data.missing = 'error': "
                                         "send it); the columns are ['small', 'large', 'colour'] (and, ignored, ['is_big'])"),
    ([{"small": 0.05, "large": 2000.0, "colour": "red", "price": 3}], "row 0: unknown column(s) ['price']; the columns are"),
    ([{"small": None, "large": 2000.0, "colour": "red"}], "row 0, column 'small': the value is missing (None); this version was trained "
                                                          "with data.missing = 'error', so it fills no missing field: send a finite number"),
    ([[0.05, "NA", "red"]], "row 0, column 'large': the value is missing ('NA'); this version was trained with data.missing = 'error'"),
    ([[0.05, 2000.0, ""]], "row 0, column 'colour': the value is missing (''); this version was trained with data.missing = 'error', so it "
                           "fills no missing field: send one of ['blue', 'green', 'red']"),
    ([[0.05, 2000.0, "red"], [0.05, "2000", "red"]], "row 1, column 'large': expected a finite number, got '2000'"),
    ([[0.05, 2000.0, "red"], [10**400, 2000.0, "red"]], "row 1, column 'small': expected a finite number, got 1000000"),
    ([[0.05, 2000.0, "purple"]], "row 0, column 'colour': unknown category 'purple'; known: ['blue', 'green', 'red']"),
    ([[0.05, 2000.0]], "row 0: expected 3 values in the column order ['small', 'large', 'colour'], got 2 values"),
    ([{"small": 0.05, "large": 2000.0, "colour": "red"}, [0.05, 2000.0, "red"]], "row 1: expected an object keyed by column name"),
])
def test_bad_table_rows_name_the_row_and_the_column(table_registry, rows, message):
    with make_client(table_registry) as client:
        wait_ready(client.get)
        response = client.post("/v1/models/rows/encode", json={"inputs": rows})
    assert response.status_code == 422 and response.json()["detail"].startswith(message)


def test_each_name_has_its_own_operations_where_the_loaded_versions_take_different_rows(table_registry, tmp_path):
    """A body's schema cannot depend on the path's {name}: beside a digits version, the table's code rows (2 numbers)
    are admitted on its own decode route only, and the digits' (4) on theirs."""
    import shutil

    from tests.conftest import digits_run

    registry = Registry(tmp_path / "registry")
    shutil.copytree(table_registry.root / "rows", registry.root / "rows")
    train(digits_run("digits-pca", "pca"), registry, progress=False)
    with make_client(registry) as client:
        wait_ready(client.get)
        paths = client.get("/openapi.json").json()["paths"]
        assert "/v1/models/{name}/decode" not in paths and "/v1/models/{name}/versions/{version}/decode" not in paths
        for name, width in (("rows", 2), ("digits-pca", 4)):
            for path in (f"/v1/models/{name}/decode", f"/v1/models/{name}/versions/{{version}}/decode"):
                inputs = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]
                assert (inputs["items"]["minItems"], inputs["items"]["maxItems"]) == (width, width), path
            (version,) = [p for p in paths[f"/v1/models/{name}/versions/{{version}}/decode"]["post"]["parameters"] if p["name"] == "version"]
            assert version["schema"]["enum"] == ["1", "latest"]
        digits_rows = paths["/v1/models/digits-pca/encode"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]["inputs"]
        assert [form["items"]["maxItems"] for form in digits_rows["anyOf"]] == [64, 8]  # flat or nested, no table rows
        # what the shared document used to admit for every name: digits codes, sent to the table
        response = client.post("/v1/models/rows/decode", json={"inputs": [[0.0, 0.0, 0.0, 0.0]]})
        assert (response.status_code, response.json()) == (422, {"detail": "each row must be 2 numbers; got rows of shape [4]"})


@pytest.fixture(scope="module")
def penguins_registry(tmp_path_factory) -> Registry:
    """A version trained with no config on a penguins-like table: its empty fields filled, a date column, columns left out."""
    from aeserve.training.recipes import recipe_run_config
    from tests.training.data.test_tables import write_penguins

    folder = tmp_path_factory.mktemp("penguins")
    registry = Registry(folder / "registry")
    config, dataset = recipe_run_config(str(write_penguins(folder / "penguins.csv")), "species",
                                        ["train.epochs=3", "train.report=false"], name="penguins")
    train(config, registry, progress=False, dataset=dataset, state_dir=folder / "state")
    return registry


PENGUIN = {"island": "Dream", "bill_length_mm": 41.5, "body_mass_g": 3900.0, "sex": "female", "year": 2008, "observed": "2008-06-02"}


def test_a_version_trained_with_filled_fields_fills_null_na_empty_and_left_out_values_as_training_did(penguins_registry):
    version = penguins_registry.load("penguins")
    fill = {f["name"]: f.get("fill") for f in version.manifest["features"]}
    gaps = [{**PENGUIN, "bill_length_mm": None, "sex": "NA"}, {**PENGUIN, "body_mass_g": "", "observed": None},
            {k: v for k, v in PENGUIN.items() if k not in ("island", "year", "observed")}, PENGUIN]
    # As the model takes them: [island one-hot 3, bill, bill missing, mass, mass missing, sex one-hot 2 + missing, year, observed 2 + missing]
    def row(island, bill, mass, sex, year, observed):
        def number(value, name):
            return [value, 0] if value is not None else [fill[name], 1]

        return [*(np.array(["Biscoe", "Dream", "Torgersen"]) == island), *number(bill, "bill_length_mm"), *number(mass, "body_mass_g"),
                *(np.array(["female", "male", None]) == sex), year, *([*observed, 0] if observed is not None else [*fill["observed"], 1])]

    expected = np.array([row("Dream", None, 3900.0, None, 2008, (2008, 154)), row("Dream", 41.5, None, "female", 2008, None),
                         row(fill["island"], 41.5, 3900.0, "female", fill["year"], None), row("Dream", 41.5, 3900.0, "female", 2008, (2008, 154))],
                        np.float32)
    with make_client(penguins_registry) as client:
        wait_ready(client.get)
        encoded = client.post("/v1/models/penguins/encode", json={"inputs": gaps}).json()
        answer = client.post("/v1/models/penguins/reconstruct", json={"inputs": gaps}).json()
        as_arrays = client.post("/v1/models/penguins/encode", json={"inputs": [[None, "NA", "", "n/a", 2008, "1970-01-01"]]}).json()
    assert encoded["imputed"] == answer["imputed"] == [["bill_length_mm", "sex"], ["body_mass_g", "observed"], ["island", "year", "observed"], []]
    np.testing.assert_allclose(encoded["outputs"], version.encode(expected), rtol=1e-5, atol=1e-5)
    x_hat, errors, _ = version.reconstruct(expected)
    np.testing.assert_allclose(answer["errors"], errors, rtol=1e-4)
    assert as_arrays["imputed"] == [["island", "bill_length_mm", "body_mass_g", "sex"]]
    assert all(row["sex"] in ("female", "male", None) and len(row["observed"]) == 10 for row in answer["outputs"])
    assert [sorted(row) for row in answer["feature_errors"]] == [sorted(PENGUIN)] * 4


def test_object_rows_may_carry_the_label_and_the_left_out_columns_and_a_date_not_seen_in_training(penguins_registry):
    version = penguins_registry.load("penguins")
    carrying = {**PENGUIN, "species": "Adelie", "Name": "bird-9999", "rowid": 7, "comment": "new bird", "observed": "2031-07-04T10:00:00Z"}
    with make_client(penguins_registry) as client:
        wait_ready(client.get)
        answer = client.post("/v1/models/penguins/encode", json={"inputs": [carrying]}).json()
        unknown = client.post("/v1/models/penguins/encode", json={"inputs": [{**carrying, "beak": 3}]})
        bad_date = client.post("/v1/models/penguins/encode", json={"inputs": [{**PENGUIN, "observed": 2008}]})
        schema = client.get("/openapi.json").json()["paths"]["/v1/models/{name}/encode"]["post"]["requestBody"]["content"]["application/json"]
    taken = np.array([[0, 1, 0, 41.5, 0, 3900.0, 0, 1, 0, 0, 2008, 2031, 185, 0]], np.float32)
    np.testing.assert_allclose(answer["outputs"], version.encode(taken), rtol=1e-5, atol=1e-5)
    assert answer["imputed"] == [[]]
    assert unknown.status_code == 422 and unknown.json()["detail"] == (
        "row 0: unknown column(s) ['beak']; the columns are ['island', 'bill_length_mm', 'body_mass_g', 'sex', 'year', 'observed'] "
        "(and, ignored, ['rowid', 'species', 'Name', 'comment'])")
    assert bad_date.status_code == 422 and bad_date.json()["detail"] == "row 0, column 'observed': expected a date as ISO text (YYYY-MM-DD), got 2008"
    # The document admits what the server takes: each column may be left out or null, the ignored columns are properties.
    forms = [form["items"] for form in schema["schema"]["properties"]["inputs"].get("anyOf", [])] or [schema["schema"]["properties"]["inputs"]["items"]]
    objects = next(form for form in forms if form["type"] == "object")
    assert objects["required"] == [] and set(objects["properties"]) == {*PENGUIN, "rowid", "species", "Name", "comment"}
    assert objects["properties"]["sex"] == {"enum": ["female", "male", *MISSING_TEXTS, None]}
    assert objects["properties"]["bill_length_mm"]["anyOf"][1] == {"enum": [*MISSING_TEXTS, None]}


def test_a_version_published_before_fields_were_filled_refuses_them_and_still_ignores_its_label_and_excluded_columns():
    from aeserve.service.errors import Invalid
    from aeserve.service.tables import TableRows

    manifest = {"features": [{"name": "small", "type": "number"}, {"name": "colour", "type": "category", "categories": ["blue", "red"]}],
                "training": {"data": {"label": "is_big", "exclude": ["id"], "missing": "median"}}}
    table = TableRows.of(manifest)
    x, objects, imputed = table.encode([{"small": 0.5, "colour": "red", "is_big": 1, "id": 7}], 10)
    assert x.tolist() == [[0.5, 0.0, 1.0]] and objects and imputed == [[]]
    with pytest.raises(Invalid, match=r"^row 0, column 'small': the value is missing \('NA'\); this version holds no value to fill it "
                                      r"with \(published before served rows were filled\): send a finite number$"):
        table.encode([["NA", "red"]], 10)
    assert table.decode(np.array([[0.25, 0.2, 0.7]]), objects=False) == [[0.25, "red"]]


def test_object_rows_name_the_first_bad_field_in_row_order_then_column_order():
    from aeserve.service.errors import Invalid
    from aeserve.service.tables import TableRows

    table = TableRows([{"name": "a", "type": "number"}, {"name": "b", "type": "category", "categories": ["x"]}])
    rows = [{"a": 1.0, "b": "x"}, {"a": 2.0, "b": "y"}, {"a": "z", "b": "x"}, "not a row"]
    with pytest.raises(Invalid, match=r"^row 1, column 'b': unknown category 'y'; known: \['x'\]$"):
        table.encode(rows, 10)
    rows[1]["b"] = "x"
    with pytest.raises(Invalid, match=r"^row 2, column 'a': expected a finite number, got 'z'$"):
        table.encode(rows, 10)
    rows[2]["a"] = 10**400  # an integer JSON may send, beyond float64
    with pytest.raises(Invalid, match=r"^row 2, column 'a': expected a finite number, got 1000"):
        table.encode(rows, 10)
    rows[2]["a"] = 3
    with pytest.raises(Invalid, match=r"^row 3: expected an object keyed by column name, as row 0 is$"):
        table.encode(rows, 10)
    out, objects, imputed = table.encode(rows[:3], 10)
    assert out.dtype == np.float64 and out.tolist() == [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]] and objects and imputed == [[], [], []]
