"""Visual question answering pairs for a SynthCXR study, from its ground truth.

Questions are generated from the drawn findings (never from the report), so every answer
is true of the image. Two kinds, as in VQA-RAD and SLAKE:

- ``closed``: yes/no about one finding ("Is there a pleural effusion?"). Every present
  finding is asked about, plus as many absent ones (sampled), so "yes" and "no" are
  balanced and a question-only model cannot do better than chance on them.
- ``open``: which finding is at a place, which side, which zone, how severe, how many
  abnormal findings. Open answers come from a small closed vocabulary (see
  :data:`OPEN_ANSWERS`), so VQA is answer classification.

Each pair is ``{"question", "answer", "type": "closed"|"open", "kind", "finding"}``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOUN = {
    "Cardiomegaly": "cardiomegaly", "Pleural Effusion": "a pleural effusion", "Consolidation": "consolidation",
    "Atelectasis": "atelectasis", "Edema": "pulmonary edema", "Nodule": "a lung nodule",
    "Calcified Granuloma": "a calcified granuloma", "Pneumothorax": "a pneumothorax", "Scoliosis": "scoliosis",
    "Support Devices": "a support device", "Fracture": "a fracture",
}
SHORT = {  # the open answer naming a finding
    "Cardiomegaly": "cardiomegaly", "Pleural Effusion": "pleural effusion", "Consolidation": "consolidation",
    "Atelectasis": "atelectasis", "Edema": "edema", "Nodule": "nodule", "Calcified Granuloma": "calcified granuloma",
    "Pneumothorax": "pneumothorax", "Scoliosis": "scoliosis", "Support Devices": "support device",
    "Fracture": "fracture",
}
SIDED = ("Pleural Effusion", "Consolidation", "Atelectasis", "Nodule", "Calcified Granuloma", "Pneumothorax", "Fracture")
ZONED = ("Consolidation", "Atelectasis", "Nodule", "Calcified Granuloma", "Fracture")
OPEN_ANSWERS = {
    "which_finding": sorted(SHORT.values()) + ["none"],
    "side": ["left", "right", "bilateral"],
    "zone": ["upper", "mid", "lower"],
    "severity": ["mild", "small", "moderate", "severe", "large"],
    "count": ["0", "1", "2", "3", "4 or more"],
}


def _count_answer(n: int) -> str:
    return str(n) if n < 4 else "4 or more"


def vqa_pairs(findings: Sequence[dict], classes: Sequence[str], rng: np.random.Generator) -> list[dict]:
    """Question-answer pairs for one study. ``findings`` are the study's finding records
    (``meta["findings"]``: name, side, zone, severity)."""
    present = {f["name"]: f for f in findings}
    pairs: list[dict] = []
    absent = [c for c in classes if c in NOUN and c not in present]
    asked_absent = rng.permutation(len(absent))[: max(1, len(present))] if absent else []
    for name in [c for c in classes if c in present] + [absent[int(i)] for i in asked_absent]:
        pairs.append({"question": f"Is there {NOUN[name]}?", "answer": "yes" if name in present else "no",
                      "type": "closed", "kind": "presence", "finding": name})

    for name, f in present.items():
        side, zone, severity = f.get("side", ""), f.get("zone", ""), f.get("severity", "")
        if name in SIDED and side in OPEN_ANSWERS["side"]:
            pairs.append({"question": f"Which side is the {SHORT[name]} on?", "answer": side,
                          "type": "open", "kind": "side", "finding": name})
        if name in ZONED and zone in OPEN_ANSWERS["zone"]:
            pairs.append({"question": f"In which lung zone is the {SHORT[name]}?", "answer": zone,
                          "type": "open", "kind": "zone", "finding": name})
        if severity in OPEN_ANSWERS["severity"]:
            pairs.append({"question": f"How severe is the {SHORT[name]}?", "answer": severity,
                          "type": "open", "kind": "severity", "finding": name})
        if side in ("left", "right") and zone in OPEN_ANSWERS["zone"] and name in ZONED:
            # Only when exactly one finding occupies that place, so the answer is unique.
            here = [n for n, g in present.items() if g.get("side") == side and g.get("zone") == zone and n in ZONED]
            if len(here) == 1:
                pairs.append({"question": f"What abnormality is in the {side} {zone} zone?", "answer": SHORT[name],
                              "type": "open", "kind": "which_finding", "finding": name})
    pairs.append({"question": "How many abnormal findings are there?", "answer": _count_answer(len(present)),
                  "type": "open", "kind": "count", "finding": ""})
    return pairs
