"""The HTTP service: the app and its settings, the codecs over one request pipeline (api/), the runtime (store,
batcher, engines), the Python client re-exported from aeserve_client, and `aeserve serve`."""
