"""Zero-shot prompts: positive and negative sentences per finding, in report language.

Zero-shot classification is multi-label, so each class has a *positive* prompt set
(the finding is present) and a *negative* one (it is absent); the scores of the two
ensembles are compared with a softmax over the pair (see :mod:`medvlp.eval.zeroshot`).

A user prompt file (YAML or JSON) has the same structure as :data:`DEFAULT_PROMPTS`::

    Cardiomegaly:
      positive: ["cardiomegaly.", "the heart is enlarged."]
      negative: ["no cardiomegaly.", "heart size is normal."]

Entries of the file replace the default entry of the same class; classes the file does
not name keep their defaults. A class with prompts in neither raises
:class:`~medvlp.errors.EvaluationError`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import yaml

from medvlp.errors import DataError, EvaluationError

Prompts = dict[str, dict[str, list[str]]]


def _p(positive: list[str], negative: list[str]) -> dict[str, list[str]]:
    return {"positive": positive, "negative": negative}


DEFAULT_PROMPTS: Prompts = {
    "No Finding": _p(
        ["no acute cardiopulmonary abnormality.", "no acute cardiopulmonary process.", "the lungs are clear.",
         "normal chest radiograph."],
        # "not normal" is said in reports by naming an abnormality, so the negative side is
        # an ensemble of common abnormal statements rather than a negated normal phrase
        ["abnormal chest radiograph.", "cardiomegaly.", "pleural effusion.", "focal consolidation.",
         "pulmonary nodule.", "pneumothorax.", "pulmonary edema.", "atelectasis."],
    ),
    "Enlarged Cardiomediastinum": _p(
        ["the mediastinum is widened.", "enlarged cardiomediastinal silhouette.", "widened mediastinum."],
        ["the mediastinum is normal.", "normal cardiomediastinal silhouette.", "no mediastinal widening."],
    ),
    "Cardiomegaly": _p(
        ["cardiomegaly.", "the heart is enlarged.", "enlarged cardiac silhouette."],
        ["no cardiomegaly.", "heart size is normal.", "the cardiac silhouette is normal in size."],
    ),
    "Lung Opacity": _p(
        ["lung opacity.", "there is an opacity in the lung.", "airspace opacity is present."],
        ["no lung opacity.", "the lungs are clear without opacity.", "no focal airspace opacity."],
    ),
    "Lung Lesion": _p(
        ["lung lesion.", "there is a pulmonary lesion.", "a focal lung lesion is seen."],
        ["no lung lesion.", "no pulmonary lesion.", "no focal lung lesion is seen."],
    ),
    "Nodule": _p(
        ["pulmonary nodule.", "there is a nodule in the lung.", "a nodular opacity is seen."],
        ["no pulmonary nodule.", "no nodules are seen.", "no suspicious pulmonary nodules."],
    ),
    "Mass": _p(
        ["lung mass.", "there is a mass in the lung.", "a pulmonary mass is present."],
        ["no lung mass.", "no pulmonary mass.", "no mass is seen."],
    ),
    "Edema": _p(
        ["pulmonary edema.", "there is interstitial edema.", "findings consistent with pulmonary edema."],
        ["no pulmonary edema.", "no edema.", "no evidence of pulmonary edema."],
    ),
    "Consolidation": _p(
        ["consolidation.", "there is focal consolidation.", "airspace consolidation is present."],
        ["no consolidation.", "no focal consolidation.", "no airspace consolidation."],
    ),
    "Pneumonia": _p(
        ["pneumonia.", "findings consistent with pneumonia.", "there is a pneumonic infiltrate."],
        ["no pneumonia.", "no evidence of pneumonia.", "no findings to suggest pneumonia."],
    ),
    "Atelectasis": _p(
        ["atelectasis.", "there is bibasilar atelectasis.", "subsegmental atelectasis is present."],
        ["no atelectasis.", "no evidence of atelectasis.", "the lungs are well expanded."],
    ),
    "Pneumothorax": _p(
        ["pneumothorax.", "there is a pneumothorax.", "a small pneumothorax is present."],
        ["no pneumothorax.", "there is no pneumothorax.", "no evidence of pneumothorax."],
    ),
    "Pleural Effusion": _p(
        ["pleural effusion.", "there is a pleural effusion.", "blunting of the costophrenic angle."],
        ["no pleural effusion.", "there is no pleural effusion.", "the costophrenic angles are sharp."],
    ),
    "Pleural Other": _p(
        ["pleural thickening.", "there is pleural scarring.", "pleural abnormality is present."],
        ["no pleural thickening.", "no pleural abnormality.", "the pleura are normal."],
    ),
    "Fracture": _p(
        ["fracture.", "there is a rib fracture.", "an acute fracture is seen."],
        ["no fracture.", "no acute fracture.", "the osseous structures are intact."],
    ),
    "Support Devices": _p(
        ["support devices are present.", "an endotracheal tube is in place.", "a central venous catheter is seen."],
        ["no support devices.", "no lines or tubes.", "no medical devices are seen."],
    ),
    "Calcified Granuloma": _p(
        ["calcified granuloma.", "there is a calcified granuloma.", "a small calcified nodule is seen."],
        ["no calcified granuloma.", "no calcified nodules.", "no granulomas are seen."],
    ),
    "Scoliosis": _p(
        ["scoliosis.", "there is scoliosis of the thoracic spine.", "the thoracic spine is curved."],
        ["no scoliosis.", "the thoracic spine is straight.", "normal alignment of the spine."],
    ),
    "Emphysema": _p(
        ["emphysema.", "the lungs are hyperinflated.", "emphysematous changes are present."],
        ["no emphysema.", "the lungs are not hyperinflated.", "no emphysematous changes."],
    ),
    "Fibrosis": _p(
        ["pulmonary fibrosis.", "there are fibrotic changes.", "interstitial fibrosis is present."],
        ["no pulmonary fibrosis.", "no fibrotic changes.", "no interstitial fibrosis."],
    ),
}


def validate_prompts(prompts: object, source: str) -> Prompts:
    """Check the ``{class: {"positive": [str, ...], "negative": [str, ...]}}`` structure."""
    if not isinstance(prompts, dict):
        raise DataError(f"{source}: expected a mapping of class name -> {{positive: [...], negative: [...]}}")
    out: Prompts = {}
    for name, entry in prompts.items():
        if not isinstance(entry, dict) or set(entry) != {"positive", "negative"}:
            raise DataError(
                f"{source}: class {name!r} must map to exactly the keys 'positive' and 'negative', got {entry!r}"
            )
        clean: dict[str, list[str]] = {}
        for polarity in ("positive", "negative"):
            texts = entry[polarity]
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise DataError(f"{source}: {name}.{polarity} must be a non-empty list of non-empty strings")
            clean[polarity] = [t.strip() for t in texts]
        out[str(name)] = clean
    return out


def read_prompt_file(path: str | Path) -> Prompts:
    """Read and validate a YAML (``.yaml``/``.yml``) or JSON prompt file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path} (pass a YAML or JSON file, or omit it to use the defaults)")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({exc})") from None
    return validate_prompts(raw, str(path))


def _localised(terms: Sequence[str], severities: Sequence[str], places: Sequence[str]) -> list[str]:
    """Severity x finding x location sentences, as radiologists describe a present finding
    (MedCLIP builds its CheXpert prompts the same way: severity, subtype, location)."""
    return [f"{sev} {term} in the {place}." for sev in severities for term in terms for place in places]


_SIDES_ZONES = [f"{side} {zone} zone" for side in ("right", "left") for zone in ("upper", "mid", "lower")]
_LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe"]

#: Positive prompts that name where and how much: a present finding is reported with a place
#: and a degree, so ensembles of such sentences describe "present" better than a bare name.
LOCALISED_POSITIVES: dict[str, list[str]] = {
    "Consolidation": _localised(["consolidation", "airspace opacity"], ["patchy", "dense"], _SIDES_ZONES + _LOBES),
    "Nodule": _localised(["nodule", "nodular opacity"], ["small", "large"], _SIDES_ZONES),
    "Atelectasis": _localised(["atelectasis"], ["mild", "subsegmental"], _SIDES_ZONES + _LOBES),
    "Pneumothorax": [f"{sev} {side} pneumothorax." for sev in ("small", "moderate", "large") for side in ("right", "left")],
    "Pleural Effusion": [f"{sev} {side} pleural effusion." for sev in ("small", "moderate", "large")
                         for side in ("right", "left", "bilateral")],
}
for _name, _extra in LOCALISED_POSITIVES.items():
    DEFAULT_PROMPTS[_name]["positive"] = DEFAULT_PROMPTS[_name]["positive"] + _extra


def load_prompts(path: str | Path | None, classes: Sequence[str]) -> Prompts:
    """Prompts for exactly ``classes`` (in that order): the file's entries over the defaults.

    Raises :class:`EvaluationError` naming every class that has no prompts.
    """
    available = dict(DEFAULT_PROMPTS)
    if path is not None:
        available.update(read_prompt_file(path))
    missing = [c for c in classes if c not in available]
    if missing:
        where = f"the prompt file {path}" if path is not None else "a prompt file (YAML/JSON, see docs/evaluation.md)"
        raise EvaluationError(
            f"no zero-shot prompts for class(es) {', '.join(map(repr, missing))}; add "
            f"'<class>: {{positive: [...], negative: [...]}}' entries for them to {where}. "
            f"Classes with default prompts: {', '.join(sorted(DEFAULT_PROMPTS))}"
        )
    return {c: {"positive": list(available[c]["positive"]), "negative": list(available[c]["negative"])} for c in classes}
