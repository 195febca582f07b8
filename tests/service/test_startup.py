"""The server says when it is ready, and with what, in one log line; a registry with nothing to serve is a warning."""
import logging
import time

from tests.servers import make_client, wait_ready


def wait_for_log(caplog, match) -> None:
    """The line is written just after the first load: readiness may answer a moment before it."""
    deadline = time.monotonic() + 30
    while not any(match(m) for m in caplog.messages):
        assert time.monotonic() < deadline, "the first load never finished"
        time.sleep(0.02)


def test_ready_is_logged_with_every_loaded_version(service_registry, caplog):
    caplog.set_level(logging.INFO, logger="aeserve.service")
    with make_client(service_registry, port=8123) as client:
        wait_ready(client.get)
        wait_for_log(caplog, lambda m: m.startswith("ready"))
    versions = ", ".join(f"{name}:{v}" for name in service_registry.names() for v in service_registry.versions(name))
    count = sum(len(service_registry.versions(name)) for name in service_registry.names())
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready")]
    assert ready == [f"ready on http://127.0.0.1:8123: {count} versions of {len(service_registry.names())} models "
                     f"from {service_registry.root} ({versions})"]


def test_an_empty_registry_is_a_warning_and_not_ready(tmp_path, caplog):
    from aeserve.models.registry import Registry

    caplog.set_level(logging.INFO, logger="aeserve.service")
    expected = f"not ready: no models in {tmp_path}; it is polled for new versions"
    with make_client(Registry(tmp_path)) as client:
        wait_for_log(caplog, lambda m: m == expected)
        answer = client.get("/health/ready")
    assert answer.status_code == 503 and "no models" in answer.json()["detail"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [expected]
    assert not [m for m in caplog.messages if m.startswith("ready")]
