"""The HTTP service: FastAPI app, schemas, batching, settings, Python client, `aeserve serve`."""
