"""`aeserve serve`'s flags come from the Settings class: every setting has one, and none restates a default."""
import argparse

import pytest

from aeserve.cli import build_parser
from aeserve.service.cli import settings_from_args
from aeserve.service.settings import Settings


def serve_action(dest: str):
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    return next((a for a in serve._actions if a.dest == dest), None)


def test_every_setting_has_a_flag_that_names_its_variable_and_default():
    for name, field in Settings.model_fields.items():
        action = serve_action(name)
        assert action is not None, name
        assert action.default == argparse.SUPPRESS  # the defaults live in Settings alone
        assert f"AESERVE_{name.upper()}" in action.help and f"default: {'null' if field.default is None else field.default}" in action.help


def test_flags_override_the_environment_which_overrides_the_defaults(monkeypatch):
    monkeypatch.setenv("AESERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("AESERVE_PORT", "9001")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "9100", "--no-access-log", "--engine", "torch"]))
    assert (settings.port, settings.max_queue, settings.access_log, settings.engine) == (9100, 7, False, "torch")
    assert settings.max_batch_rows == Settings.model_fields["max_batch_rows"].default


def test_a_bad_value_names_the_flag_and_what_is_allowed(capsys):
    with pytest.raises(SystemExit) as exited:
        settings_from_args(build_parser().parse_args(["serve", "--engine", "tensorrt", "--port", "70000"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err == ("aeserve serve: error: --port: Input should be less than or equal to 65535; "
                   "--engine: Input should be 'onnx' or 'torch'\n")
