"""The Python client, kept importable here: it lives in the light distribution ``aeserve-client`` (``client/``, import
``aeserve_client``), which the main distribution installs too.

    from aeserve.service.client import Client
    with Client("http://127.0.0.1:8000") as client:
        result = client.encode("fmnist-mlp30", images)      # images: (n, 28, 28) or (n, 784)
        result.outputs, result.model, result.version
"""
from aeserve_client import *  # noqa: F403  (the client's public names, as aeserve_client lists them)
from aeserve_client import __all__  # noqa: F401  (and the same list of them)
