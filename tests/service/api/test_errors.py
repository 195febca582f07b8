"""Domain errors and the one table that maps them to each protocol's status: the core knows no HTTP."""
import ast
from pathlib import Path

import pytest

from aeserve.service import errors
from aeserve.service.api.errors import STATUSES, V1, V2, MethodNotAllowed, headers_of, status_of
from aeserve.service.errors import Invalid, Malformed, NotFound, NotReady, Overloaded, TooLarge, TooManyRows, Unauthenticated, UnsupportedMedia

SERVICE = Path(errors.__file__).parent
CORE = [*sorted((SERVICE / "runtime").glob("*.py")), *(SERVICE / name for name in ("errors.py", "pipeline.py", "tables.py", "operations.py"))]


@pytest.mark.parametrize(("error", "v1", "v2"), [
    (Malformed("m"), 400, 400),
    (Unauthenticated("m"), 401, 401),
    (NotFound("m"), 404, 404),
    (MethodNotAllowed("m", ("POST",)), 405, 405),
    (TooLarge("m"), 413, 413),
    (TooManyRows(250, 100), 413, 413),
    (UnsupportedMedia("m"), 415, 415),
    (Invalid("m"), 422, 400),  # the Open Inference Protocol has no 422
    (NotReady("m"), 503, 503),
    (Overloaded("m"), 503, 503),
])
def test_each_error_has_one_status_per_protocol(error, v1, v2):
    assert (status_of(error, V1), status_of(error, V2)) == (v1, v2)


def test_every_domain_error_is_in_the_table():
    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.ServiceError)]
    abstract = {errors.ServiceError, errors.Unavailable}
    assert [k.__name__ for k in kinds if k not in abstract and not any(base in STATUSES for base in k.__mro__)] == []


def test_what_a_client_acts_on_goes_out_as_headers():
    assert headers_of(Overloaded("busy", retry_after=3)) == {"Retry-After": "3"}
    assert headers_of(NotReady("loading")) == {"Retry-After": "1"}
    assert headers_of(Unauthenticated("key")) == {"WWW-Authenticate": "Bearer"}
    assert headers_of(MethodNotAllowed("no", ("POST",))) == {"Allow": "POST"}
    assert headers_of(TooManyRows(250, 100)) == {"X-Max-Rows": "100"}
    assert headers_of(Invalid("shape")) == {}


def test_the_row_limit_is_worded_once():
    assert TooManyRows(250, 100, "input 'input': ").message == "input 'input': 250 rows exceed the limit of 100 rows per request"
    sources = [p for p in SERVICE.rglob("*.py") if p.name != "errors.py"]
    assert [str(p) for p in sources if "rows exceed the limit" in p.read_text()] == []


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_imports_no_http(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert [m for m in imported if m.split(".")[0] in ("fastapi", "starlette") or m.startswith("aeserve.service.api")] == []
