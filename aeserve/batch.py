"""Batch encoding for pipelines of your own: ``Encoder`` maps batches of raw rows to codes (docs/batch.md).

    ds.map_batches(aeserve.batch.Encoder, fn_constructor_kwargs=dict(registry=..., name=..., version=...), concurrency=2)
"""
from aeserve.training.batch.encoder import Encoder

__all__ = ["Encoder"]
