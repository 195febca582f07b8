"""`aeserve serve`: run the HTTP service with uvicorn. Its flags are generated from ``Settings``."""
from __future__ import annotations

import argparse
import logging
import sys
import threading
import typing

GIL_SWITCH_SECONDS = 0.0005


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_commands(sub: argparse._SubParsersAction) -> None:
    from aeserve.service.settings import Settings

    p = sub.add_parser("serve", help="serve the registry's models over HTTP",
                       description="Every flag also reads from its AESERVE_* environment variable; a flag given wins.")
    for name, field in Settings.model_fields.items():
        env = f"AESERVE_{name.upper()}"
        help_text = f"{field.description or name} (default {field.default}; {env})"
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
        if field.annotation is bool:
            p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(field.annotation, str)
            p.add_argument(_flag(name), dest=name, type=kind, choices=choices, default=None, help=help_text)
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace):
    """Flags override AESERVE_* environment variables, which override the defaults."""
    from aeserve.service.settings import Settings

    return Settings(**{key: value for key, value in vars(args).items() if key in Settings.model_fields and value is not None})


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aeserve.service.app import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from_args(args)
    # The model thread gives up the GIL at every torch op and waits to get it back while the event loop parses
    # requests; by default a waiting thread asks for it only after 5 ms. At 0.5 ms a batch of single-row requests
    # spends less time waiting than computing (docs/serving.md).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if app.state.draining or settings.drain_grace_seconds == 0:
                super().handle_exit(sig, frame)  # a second signal, or no grace: stop accepting now
                return
            # Readiness answers 503 at once while requests are still served, so load balancers stop sending
            # before the listener closes; then uvicorn stops accepting and waits for requests in flight.
            app.state.draining = True
            threading.Timer(settings.drain_grace_seconds, super().handle_exit, (sig, frame)).start()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=settings.drain_seconds)
    DrainingServer(config).run()
    return 0
