"""Encoders: ViT, BERT-style text encoders; they register in medvlp.registry.ENCODERS."""
