"""`aeserve serve`: run the HTTP service with uvicorn. Its flags are generated from ``Settings``."""
from __future__ import annotations

import argparse
import logging
import sys
import threading

GIL_SWITCH_SECONDS = 0.0005


def add_commands(sub: argparse._SubParsersAction) -> None:
    from pydantic_settings import CliSettingsSource

    from aeserve.service.settings import Settings

    p = sub.add_parser("serve", help="serve the registry's models over HTTP",
                       description="Every flag also reads from its AESERVE_* environment variable; a flag given wins.")
    # pydantic-settings writes the flags, with their types, choices and defaults, from the Settings fields.
    source = CliSettingsSource(Settings, root_parser=p, cli_kebab_case=True, cli_implicit_flags=True)
    for action in p._actions:
        if action.dest in Settings.model_fields:
            action.help = f"{action.help} [{Settings.model_config['env_prefix']}{action.dest.upper()}]"
    p.set_defaults(func=cmd_serve, settings_source=source)


def settings_from_args(args: argparse.Namespace):
    """Flags override AESERVE_* environment variables, which override the defaults; a bad value exits 2 naming its flag."""
    from pydantic import ValidationError

    from aeserve.service.settings import Settings

    try:
        return Settings(_cli_settings_source=args.settings_source(parsed_args=args))
    except ValidationError as e:
        problems = "; ".join(f"--{str(error['loc'][0]).replace('_', '-')}: {error['msg']}" for error in e.errors())
        print(f"aeserve serve: error: {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from aeserve.models.index import IndexFileError
    from aeserve.service.app import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from_args(args)
    # The model thread gives up the GIL at every torch op and waits to get it back while the event loop parses
    # requests; by default a waiting thread asks for it only after 5 ms. At 0.5 ms a batch of single-row requests
    # spends less time waiting than computing (docs/serving.md).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    try:
        app = create_app(settings)
    except IndexFileError as e:  # a bad --index: one line, as a bad flag gets
        print(f"aeserve serve: error: {e}", file=sys.stderr)
        return 2

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
