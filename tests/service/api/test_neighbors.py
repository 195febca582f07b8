"""POST .../neighbors over HTTP: from inputs or codes, ids and distances equal to exact search over the codes an
encode run stored; codes of another version 409, a version without an index 404, bad k and codes 422; --index as a
flag and as its environment variable; the Python client."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from aeserve.cli import build_parser, main
from aeserve.service.cli import settings_from_args
from aeserve.service.client import Client, ConflictError, NotFoundError
from tests.servers import make_client, wait_ready
from tests.training.test_index import NAME, exact, stored, stored_codes  # noqa: F401  (stored: a fixture)

K = 5


@pytest.fixture(scope="module")
def indexed(stored, tmp_path_factory):  # noqa: F811
    """(registry, {form: codes file}, {form: index folder}): NAME:1's indexes, HNSW, of the stored codes in each form."""
    registry, _, files, _ = stored
    folder = tmp_path_factory.mktemp("indexes")
    indexes = {form: folder / f"{form}.index" for form in files}
    for form, path in indexes.items():
        assert main(["index", f"{NAME}:1", "--codes", str(files[form]), "--out", str(path), "--approximate", "--registry", str(registry.root)]) == 0
    return registry, files, indexes


def serving(indexed, form: str):
    registry, _, indexes = indexed
    return make_client(registry, index=[f"{NAME}={indexes[form]}"])


@pytest.mark.parametrize("form", ["float", "int8", "binary"])
def test_inputs_and_stored_codes_find_the_exact_searchs_neighbours(indexed, form):
    registry, files, _ = indexed
    images = load_digits().images[:8].astype(np.float32)
    version = registry.load(NAME, 1)
    codes = stored_codes(files[form])
    scale = version.code_quantization.scale.astype(np.float64)
    with serving(indexed, form) as http:
        wait_ready(http.get)
        answer = http.post(f"/v1/models/{NAME}/versions/1/neighbors", json={"inputs": images.reshape(8, -1).tolist(), "k": K})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model"], body["version"], body["codes"], body["metric"]) == (NAME, "1", form, "hamming" if form == "binary" else "l2")
        floats = version.encode(images)
        if form == "binary":
            truth = exact(form, codes, version.code_quantization.binary(floats), None)
        else:
            truth = np.sqrt(((floats[:, None, :].astype(np.float64) - codes[None] * (scale if form == "int8" else 1)) ** 2).sum(axis=2))
        np.testing.assert_allclose(body["distances"], np.sort(truth, axis=1)[:, :K], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(truth, np.array(body["ids"]), axis=1), body["distances"], rtol=1e-4, atol=1e-4)
        if form != "binary":
            assert body["ids"] == np.argsort(truth, axis=1, kind="stable")[:, :K].tolist()
        sent = http.post(f"/v1/models/{NAME}/versions/1/neighbors?k={K}", json={"codes": codes[:6].tolist(), "code_version": 1})
        assert sent.status_code == 200, sent.text
        truth = exact(form, codes, codes[:6], scale)
        np.testing.assert_allclose(sent.json()["distances"], np.sort(truth, axis=1)[:, :K], rtol=1e-4, atol=1e-4)
        assert [row[0] for row in sent.json()["ids"]] == list(range(6)) or form == "binary"  # each stored code is its own nearest


def test_codes_of_another_version_bad_k_and_bad_codes_are_refused(indexed):
    registry, files, _ = indexed
    codes = stored_codes(files["int8"])[:2].tolist()
    path = f"/v1/models/{NAME}/versions/1/neighbors"
    with serving(indexed, "int8") as http:
        wait_ready(http.get)

        def refused(status: int, detail: str, **request) -> None:
            answer = http.post(request.pop("path", path), **request)
            assert (answer.status_code, answer.json()) == (status, {"detail": detail})

        refused(409, f"the codes are of {NAME} version 2, this is version 1: their codes differ; decode them with version 2, or encode "
                     "the data again with version 1", json={"codes": codes, "code_version": 2})
        refused(404, f"no index of {NAME}:2's codes on this server (it has {NAME}:1; ask that version); build one with aeserve index "
                     f"{NAME}:2 and start the server with --index {NAME}=PATH", path=f"/v1/models/{NAME}/neighbors", json={"codes": codes})
        refused(422, "k must be a whole number from 1 to 1000; got 0", json={"codes": codes, "k": 0})
        refused(422, "k must be a whole number from 1 to 1000; got 1001", json={"codes": codes}, params={"k": "1001"})
        refused(422, "k is given twice, differently: '3' in the query string, 4 in the body", json={"codes": codes, "k": 4}, params={"k": "3"})
        refused(422, f"codes: the index holds int8 codes of {NAME}:1, rows of 12 numbers; got rows of shape [6]", json={"codes": [[1] * 6]})
        refused(422, "codes: row 1 holds a value that is not a whole number from -127 to 127; the index holds int8 codes, as "
                     "encode?codes=int8 answers them", json={"codes": [[0] * 12, [0] * 11 + [200]]})
        refused(422, 'give "inputs" (rows the version encodes) or "codes" (codes in the index\'s form), not both',
                json={"codes": codes, "inputs": [[0] * 64]})
        refused(422, 'code_version applies to "codes"; inputs are encoded by the version asked', json={"inputs": [[0] * 64], "code_version": 1})
        refused(422, "each row must be 64 numbers or nested shape [8, 8]; got rows of shape [3]", json={"inputs": [[0, 0, 0]]})
        schema = http.get("/openapi.json").json()["paths"]
        assert f"/v1/models/{NAME}/versions/1/neighbors" in schema and f"/v1/models/{NAME}/neighbors" not in schema  # latest is 2: no index
    with make_client(registry) as plain:
        wait_ready(plain.get)
        refused_plain = plain.post(path, json={"inputs": [[0] * 64]})
        assert refused_plain.status_code == 404 and refused_plain.json()["detail"].startswith(f"no index of {NAME}:1's codes on this server; build")
        assert not any(p.endswith("/neighbors") for p in plain.get("/openapi.json").json()["paths"])


def test_index_flags_and_the_environment_variable(indexed, monkeypatch, tmp_path, capsys):
    _, _, indexes = indexed
    parser = build_parser()
    args = parser.parse_args(["serve", "--index", f"{NAME}={indexes['float']}", "--index", f"b={indexes['int8']}"])
    assert settings_from_args(args).index == [f"{NAME}={indexes['float']}", f"b={indexes['int8']}"]
    monkeypatch.setenv("AESERVE_INDEX", f"{NAME}={indexes['float']},{NAME}={indexes['binary']}")
    assert settings_from_args(parser.parse_args(["serve"])).index == [f"{NAME}={indexes['float']}", f"{NAME}={indexes['binary']}"]
    monkeypatch.delenv("AESERVE_INDEX")
    for flag, error in [(f"{NAME}={tmp_path}", f"{tmp_path}: no index.json; give the folder that aeserve index wrote"),
                        (f"other={indexes['float']}", f"--index other={indexes['float']}: it indexes codes of {NAME}:1, not of other"),
                        (str(indexes["float"]), f"--index {str(indexes['float'])!r}: give NAME=PATH, the model's name and the folder aeserve index wrote")]:
        assert main(["serve", "--registry", str(tmp_path), "--index", flag, "--device", "cpu"]) == 2
        assert capsys.readouterr().err == f"aeserve serve: error: {error}\n"


def test_the_python_client_asks_for_neighbours(indexed):
    registry, files, _ = indexed
    images = load_digits().images[:3].astype(np.float32)
    with serving(indexed, "float") as http:
        wait_ready(http.get)
        with Client(base_url="http://testserver", transport=http._transport) as client:
            found = client.neighbors(NAME, images, k=K, version=1)
            codes = stored_codes(files["float"])
            by_codes = client.neighbors(NAME, codes=codes[:3], code_version=1, version=1, k=K)
            with pytest.raises(ConflictError):
                client.neighbors(NAME, codes=codes[:3], code_version=2, version=1)
            with pytest.raises(NotFoundError):
                client.neighbors(NAME, images)
    truth = np.sqrt(((registry.load(NAME, 1).encode(images)[:, None, :].astype(np.float64) - codes[None]) ** 2).sum(axis=2))
    assert (found.model, found.version, found.metric) == (NAME, "1", "l2") and found.distances.shape == (3, K)
    assert found.ids == np.argsort(truth, axis=1)[:, :K].tolist()
    assert [row[0] for row in by_codes.ids] == [0, 1, 2] and np.allclose(by_codes.distances[:, 0], 0, atol=1e-5)


def test_the_client_splits_neighbours_over_max_rows_and_joins_them_in_order(indexed):
    _, files, _ = indexed
    images = load_digits().images[:7].astype(np.float32)
    codes = stored_codes(files["float"])[:7]
    with serving(indexed, "float") as http:
        wait_ready(http.get)
        with Client(base_url="http://testserver", transport=http._transport) as whole, \
                Client(base_url="http://testserver", transport=http._transport, max_rows=3) as sliced:
            for asked in (dict(x=images), dict(codes=codes, code_version=1)):
                one, three = whole.neighbors(NAME, k=K, version=1, **asked), sliced.neighbors(NAME, k=K, version=1, **asked)
                assert three.ids == one.ids and len(three.ids) == 7 and three.version == "1"
                np.testing.assert_allclose(three.distances, one.distances, atol=1e-5)  # a slice of 1 row: other BLAS kernels
