"""Templated radiology reports for SynthCXR studies (FINDINGS and IMPRESSION sections).

Each positive finding is described with one of several phrasings, with its laterality, zone
and severity words; some absent findings are explicitly negated ("No pneumothorax.", "Heart
size is normal."); a study without findings reads as normal. The vocabulary is the standard
one of chest radiograph reports, so prompts written for real reports apply.

Contract (checked by the tests): a sentence that names a class by one of its
:data:`KEYWORDS` either starts with one of :data:`NEGATION_PREFIXES` - and then every class it
names is absent - or names exactly one class, which is present. No hedged (uncertain) phrasing
is used in this version.
"""
from __future__ import annotations

import numpy as np

from medvlp.data.synth.findings import Finding

# Lower-case substrings that identify a class in a sentence.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "Pleural Effusion": ("effusion",),
    "Consolidation": ("consolidation", "airspace"),
    "Nodule": ("nodule", "nodular"),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
}
NEGATION_PREFIXES = ("no ", "there is no ", "there are no ", "negative for ")

_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_SEVERITY_ADJ = {"mild": "mild", "moderate": "moderate", "severe": "marked"}
_CONSOLIDATION_ADJ = {"small": ("focal", "small"), "moderate": ("patchy", "moderate"), "large": ("extensive", "dense")}
_LOBE = {("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "mid"): "lingula", ("left", "lower"): "left lower lobe"}

_NEGATIONS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is within normal limits.",
                     "Normal heart size.", "No cardiomegaly.", "The cardiomediastinal silhouette is normal."),
    "Pleural Effusion": ("No pleural effusion.", "No pleural effusions.", "There is no pleural effusion."),
    "Consolidation": ("No focal consolidation.", "No focal airspace opacity.", "There is no consolidation."),
    "Nodule": ("No pulmonary nodules.", "No suspicious pulmonary nodule.", "There are no nodules."),
    "Pneumothorax": ("No pneumothorax.", "There is no pneumothorax."),
}
_NORMAL_IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                       "Normal chest radiograph.", "No active disease in the chest.")
_CLEAR_LUNGS = ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear.")
_BONES = ("No acute osseous abnormality.", "Osseous structures are intact.", "The visualized bones are unremarkable.")
# Order of sentences in FINDINGS: lungs, pleura, heart; IMPRESSION leads with the most urgent.
_FINDINGS_ORDER = ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax", "Cardiomegaly")
_IMPRESSION_ORDER = ("Pneumothorax", "Consolidation", "Pleural Effusion", "Cardiomegaly", "Nodule")


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def describe(f: Finding, rng: np.random.Generator) -> str:
    """One FINDINGS sentence for a present finding."""
    side, zone, sev = f.side, f.zone, f.severity
    if f.name == "Cardiomegaly":
        return _pick(rng, (
            f"The cardiac silhouette is {_SEVERITY_ADVERB[sev]} enlarged.",
            f"{_cap(_SEVERITY_ADJ[sev])} cardiomegaly.",
            f"There is {_SEVERITY_ADJ[sev]} enlargement of the cardiac silhouette.",
            f"Heart size is {_SEVERITY_ADVERB[sev]} enlarged.",
        ))
    if f.name == "Pleural Effusion":
        if side == "bilateral":
            return _pick(rng, (
                f"{_cap(sev)} bilateral pleural effusions.",
                f"There are {sev} bilateral pleural effusions with blunting of both costophrenic angles.",
                f"{_cap(sev)} pleural effusions are present bilaterally.",
            ))
        return _pick(rng, (
            f"{_cap(sev)} {side} pleural effusion.",
            f"There is a {sev} {side} pleural effusion with blunting of the {side} costophrenic angle.",
            f"{_cap(sev)} {side} pleural effusion layering at the {side} base.",
        ))
    if f.name == "Consolidation":
        adj = _pick(rng, _CONSOLIDATION_ADJ[sev])
        return _pick(rng, (
            f"{_cap(adj)} consolidation in the {side} {zone} zone.",
            f"{_cap(adj)} airspace opacity in the {side} {zone} zone, consistent with consolidation.",
            f"There is {adj} consolidation of the {_LOBE[(side, zone)]}.",
            f"{_cap(adj)} airspace consolidation in the {_LOBE[(side, zone)]}.",
        ))
    if f.name == "Nodule":
        return _pick(rng, (
            f"A {sev} nodule is seen in the {side} {zone} zone.",
            f"{_cap(sev)} nodular opacity in the {side} {zone} lung zone.",
            f"There is a {sev} pulmonary nodule in the {side} {zone} zone.",
        ))
    if f.name == "Pneumothorax":
        return _pick(rng, (
            f"{_cap(sev)} {side} pneumothorax.",
            f"There is a {sev} {side} apical pneumothorax with a visible pleural line.",
            f"{_cap(sev)} {side} apicolateral pneumothorax is present.",
            f"A {sev} {side} pneumothorax is seen, with absent lung markings peripheral to the pleural line.",
        ))
    raise ValueError(f"no report template for finding {f.name!r}")


def summarize(f: Finding, rng: np.random.Generator) -> str:
    """One IMPRESSION sentence for a present finding."""
    side, zone, sev = f.side, f.zone, f.severity
    if f.name == "Cardiomegaly":
        return _pick(rng, ("Cardiomegaly.", f"{_cap(_SEVERITY_ADJ[sev])} cardiomegaly.", "Enlarged cardiac silhouette."))
    if f.name == "Pleural Effusion":
        where = "bilateral pleural effusions" if side == "bilateral" else f"{side} pleural effusion"
        return _pick(rng, (f"{_cap(sev)} {where}.", f"{_cap(where)}."))
    if f.name == "Consolidation":
        return _pick(rng, (f"{_cap(side)} {zone} zone consolidation.", f"Consolidation in the {_LOBE[(side, zone)]}."))
    if f.name == "Nodule":
        return _pick(rng, (f"{_cap(side)} {zone} zone pulmonary nodule.",
                           f"{_cap(sev)} {side} lung nodule; CT is recommended for further evaluation."))
    if f.name == "Pneumothorax":
        return _pick(rng, (f"{_cap(sev)} {side} pneumothorax.", f"{_cap(side)} pneumothorax."))
    raise ValueError(f"no report template for finding {f.name!r}")


def build_report(findings: list[Finding], rng: np.random.Generator) -> tuple[str, str]:
    """(FINDINGS text, IMPRESSION text) for one study, headings excluded."""
    by_name = {f.name: f for f in findings}
    sentences: list[str] = []
    lung_findings = [n for n in ("Consolidation", "Nodule", "Pleural Effusion", "Pneumothorax") if n in by_name]
    if not lung_findings and rng.random() < 0.6:
        sentences.append(_pick(rng, _CLEAR_LUNGS))
    negate_pleura_together = (
        "Pleural Effusion" not in by_name and "Pneumothorax" not in by_name and rng.random() < 0.5
    )
    for name in _FINDINGS_ORDER:
        if name in by_name:
            sentences.append(describe(by_name[name], rng))
        elif name in ("Pleural Effusion", "Pneumothorax") and negate_pleura_together:
            if name == "Pleural Effusion":
                sentences.append(_pick(rng, ("No pleural effusion or pneumothorax.",
                                             "No pneumothorax or pleural effusion.")))
        elif rng.random() < 0.7:
            sentences.append(_pick(rng, _NEGATIONS[name]))
    if rng.random() < 0.5:
        sentences.append(_pick(rng, _BONES))

    if findings:
        impression = " ".join(summarize(by_name[n], rng) for n in _IMPRESSION_ORDER if n in by_name)
    else:
        impression = _pick(rng, _NORMAL_IMPRESSIONS)
    return " ".join(sentences), impression
