"""Batch encoding: a data set to a Parquet file of codes (``aeserve encode``), and ``Encoder`` for engines that map batches."""
from aeserve.training.batch.encoder import Encoder

__all__ = ["Encoder"]
