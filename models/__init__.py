"""Model families (``models.kinds``), the 2-D projector, the checkpoint format and the registry.

Imports nothing itself, so that a torch-free module here (``models.preprocessing``, ``models.small_batches``) can be
used without torch: the engine process (``service/engine_process.py``) runs on numpy and ONNX Runtime alone.
Imports neither FastAPI nor training code.
"""
