"""Pre-training methods; each module registers itself in medvlp.registry.METHODS."""
