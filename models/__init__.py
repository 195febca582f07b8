"""Model families (``models.kinds``), the 2-D projector, preprocessing, the checkpoint format, the registry and the
ONNX exporter.

Imports nothing itself, so that a torch-free module here (``models.preprocessing``, ``models.outputs``) can be used
without torch: the engine process (``service/runtime/engine_process.py``) runs on numpy and ONNX Runtime alone.
Imports neither FastAPI nor training code; starts no processes.
"""
