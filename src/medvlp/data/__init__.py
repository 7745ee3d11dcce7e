"""Data: the Sample schema, manifests, synthetic data, transforms and collation."""
