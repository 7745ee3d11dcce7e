"""Loss functions: pure modules over tensors and masks, shapes in their docstrings.

Losses never import the training loop; cross-rank gathering comes from
:mod:`medvlp.distributed`, which sits below both.
"""
from medvlp.losses.contrastive import ClipLoss, contrastive_cross_entropy, info_nce, same_key_mask

__all__ = ["ClipLoss", "contrastive_cross_entropy", "info_nce", "same_key_mask"]
