"""Pre-training methods; each module registers itself in medvlp.registry.METHODS on import."""
from medvlp.methods import clip  # noqa: F401
from medvlp.methods.base import Method

__all__ = ["Method"]
