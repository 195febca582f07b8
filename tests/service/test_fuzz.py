"""Property-based fuzzing over the OpenAPI schema (schemathesis): no 5xx, and every answer fits the schema.

Seeded and bounded for CI; a larger run: AESERVE_FUZZ_EXAMPLES=500 pytest tests/service/test_fuzz.py
"""
import os

import pytest
from aeserve.models.registry import Registry
from aeserve.training.trainer import train
from hypothesis import HealthCheck, given, settings

from tests.conftest import digits_run
from tests.service.conftest import make_client, wait_ready

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = int(os.environ.get("AESERVE_FUZZ_EXAMPLES", "25"))


def test_no_server_errors_and_answers_fit_the_schema(tmp_path):
    registry = Registry(tmp_path / "registry")
    train(digits_run("digits-pca", "pca"), registry, progress=False)
    with make_client(registry) as client:  # one app, one event loop, models loaded: as in production
        wait_ready(client.get)
        schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12

        for operation in operations:
            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                kwargs = case.as_transport_kwargs(base_url="http://testserver")
                response = client.request(**kwargs)
                assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)
                case.validate_response(response)

            check()
