"""medvlp: medical vision-language pre-training on one shared core.

The package is organised as the data flow: ``data`` (manifests, synthetic data,
transforms, collation) -> ``models`` (encoders) -> ``losses`` (pure functions) ->
``methods`` (compose encoders and losses into ``forward(batch) -> losses``) ->
``train`` (loop, optimiser, checkpoints) -> ``eval`` (downstream protocols).
"""
__version__ = "0.1.0"
