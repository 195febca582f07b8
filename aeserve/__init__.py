"""aeserve: train autoencoders offline, serve them over HTTP."""
__version__ = "0.1.0"
