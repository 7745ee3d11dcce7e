"""Datasets medvlp can generate or prepare (``medvlp list datasets``)."""
from medvlp.registry import DATASETS


@DATASETS.register("synthcxr", description="synthetic chest radiographs with known findings (`medvlp synth`)")
def synthcxr(out, **kwargs):
    from medvlp.data.synth import generate

    return generate(out, **kwargs)
