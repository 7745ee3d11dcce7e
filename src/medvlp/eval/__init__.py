"""Downstream evaluation: zero-shot classification, image-text retrieval, linear probing, prompt
tuning, localisation, VQA, fine-tuning, segmentation and detection, with a markdown / JSON / PNG
report.

The classification and retrieval modules are pure, array-level functions (embeddings and label
codes in, dicts out); the dense, VQA and fine-tuning tasks take the model and samples;
:func:`evaluate_models` in :mod:`medvlp.eval.runner` wires them to datasets and
models and is what ``medvlp evaluate`` calls.
"""
from medvlp.eval.linear_probe import evaluate_linear_probe, make_fraction_splits
from medvlp.eval.metrics import auroc_per_class, label_precision_at_k, recall_at_k, roc_curves
from medvlp.eval.prompts import DEFAULT_PROMPTS, load_prompts
from medvlp.eval.report import format_table, write_report
from medvlp.eval.retrieval import evaluate_retrieval
from medvlp.eval.runner import evaluate_models
from medvlp.eval.zeroshot import evaluate_zero_shot, zero_shot_scores

__all__ = [
    "DEFAULT_PROMPTS",
    "auroc_per_class",
    "evaluate_linear_probe",
    "evaluate_models",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "format_table",
    "label_precision_at_k",
    "load_prompts",
    "make_fraction_splits",
    "recall_at_k",
    "roc_curves",
    "write_report",
    "zero_shot_scores",
]
