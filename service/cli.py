"""`aeserve serve`: run the HTTP service with uvicorn."""
from __future__ import annotations

import argparse
import logging
import sys
import threading

GIL_SWITCH_SECONDS = 0.0005


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the registry's models over HTTP")
    p.add_argument("--registry", help="registry folder (default: $AESERVE_REGISTRY or ./registry)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where models run (default auto: a GPU when present)")
    p.add_argument("--engine", choices=["onnx", "torch"],
                   help="onnx (default): on the CPU, calls under 128 rows run on ONNX Runtime, torch runs the rest; torch: torch only")
    p.add_argument("--no-engine-process", dest="engine_process", action="store_const", const=False,
                   help="with --engine onnx: run small batches on threads of the server process instead of a child process")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set AESERVE_API_KEY)")
    p.add_argument("--models", help="comma-separated model names to serve (default: all)")
    p.add_argument("--max-batch-rows", type=int, help="most rows per model call (default 256)")
    p.add_argument("--max-wait-ms", type=float, help="batching wait for more rows (default 0)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (default 512)")
    p.add_argument("--max-inflight", type=int, help="requests in progress before 503, health routes aside (default 1024)")
    p.add_argument("--max-body-bytes", type=int, help="largest request body (default 64 MiB)")
    p.add_argument("--poll-seconds", type=float, help="how often to look for new versions (default 2; 0: never)")
    p.add_argument("--no-access-log", dest="access_log", action="store_const", const=False, help="no per-request log lines")
    p.set_defaults(func=cmd_serve)


def settings_from_args(args: argparse.Namespace):
    """Flags override AESERVE_* environment variables, which override the defaults."""
    from aeserve.models.registry import Registry
    from aeserve.service.settings import Settings

    flags = {key: value for key, value in vars(args).items()
             if key in Settings.model_fields and key != "registry" and value is not None}
    return Settings(registry=Registry.default_root(args.registry), **flags)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from aeserve.service.app import create_app

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = settings_from_args(args)
    # The model thread gives up the GIL at every torch op and waits to get it back while the event loop parses
    # requests; by default a waiting thread asks for it only after 5 ms. At 0.5 ms a batch of single-row requests
    # spends less time waiting than computing (benchmarks/serve.py (a): about +25% on 2 cores). With small batches on
    # ONNX Runtime (one GIL release per call) 0.5 ms is still the best of 0.1, 0.25, 0.5 and 2 ms (benchmarks/SERVING.md).
    # With the engine process (the default on the CPU) small batches leave the server, and this matters where they do not.
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
