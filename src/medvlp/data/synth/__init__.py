"""SynthCXR: a deterministic synthetic chest-radiograph dataset with templated reports.

``generate(out, subjects=..., seed=...)`` writes grayscale PNGs of frontal chest radiographs
(per-subject anatomy, per-study acquisition), FINDINGS / IMPRESSION report sections that
agree with what was drawn, labels for :data:`CLASSES`, ground-truth location and severity
in each sample's ``meta``, and subject-level train / val / test splits, in the manifest
format of :mod:`medvlp.data.manifest`. See docs/synthcxr.md.

Modules: ``anatomy`` (normal chest), ``findings`` (abnormalities: sampling and drawing),
``render`` (acquisition, image), ``reports`` (text), ``generator`` (dataset writing).
"""
from medvlp.data.synth.findings import CLASSES
from medvlp.data.synth.generator import GENERATOR_VERSION, generate

__all__ = ["CLASSES", "GENERATOR_VERSION", "generate"]
