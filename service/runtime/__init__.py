"""Where model calls run: the store of loaded versions, the batcher, and the engines behind one interface."""
