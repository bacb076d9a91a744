"""Where cached responses live: an in-process LRU (L1) and Redis (L2), behind one interface."""
