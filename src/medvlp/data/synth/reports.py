"""Templated radiology reports for SynthCXR studies (FINDINGS and IMPRESSION sections).

Each present finding is described with one of several phrasings (:mod:`.phrasings`) with its
laterality, zone or lobe, severity and, for devices, type and tip position; subtle findings
(small / mild, rib fractures) are sometimes hedged ("possible", "may represent", "cannot be
excluded"); some absent findings are negated; a normal study reads as normal. With the prior
study's findings, present findings are compared ("unchanged", "new since the prior study",
"interval increase") and resolved ones said to be gone. ``held_out=True`` words the report
from a disjoint template pool (the test split's).

:func:`report_contract` checks a report against its findings: every present class is
mentioned positively or hedged in both sections, hedging only for present subtle findings,
every mention of an absent class is negated, and normal statements ("The lungs are clear.")
only when what they deny is absent.
"""
from __future__ import annotations

import re

import numpy as np

from medvlp.data.synth.findings import CLASSES, SUBTLE, ZONES, Finding
from medvlp.data.synth.phrasings import POOLS

# Lower-case substrings that identify a class in a sentence.
KEYWORDS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "Pleural Effusion": ("effusion",),
    "Consolidation": ("consolidation", "consolidative", "airspace", "pneumonia"),
    "Atelectasis": ("atelectasis", "atelectatic", "collapse", "volume loss"),
    "Edema": ("edema", "congestion", "kerley", "cephalization"),
    "Nodule": ("nodule", "nodular"),
    "Calcified Granuloma": ("granuloma", "granulomatous", "calcified", "calcification"),
    "Pneumothorax": ("pneumothorax", "pneumothoraces"),
    "Scoliosis": ("scoliosis", "scoliotic", "curvature", "convex"),
    "Support Devices": ("tube", "catheter", "central line", "picc", "pacemaker", "defibrillator", "icd",
                        "sternotomy", "device"),
    "Fracture": ("fracture",),
}
NEGATION_PREFIXES = ("no ", "there is no ", "there are no ", "negative for ", "without ")
NEGATION_CUES = (" not ", "has resolved", "resolution of")  # anywhere in a sentence
HEDGE_CUES = ("possible", "possibly", "may represent", "may be", "cannot be excluded", "likely", "probable",
              "probably", "questionable", "suspicious for", "could represent", "could be", "suggestive of")
_LUNG = ("Consolidation", "Atelectasis", "Edema", "Nodule", "Calcified Granuloma", "Pleural Effusion", "Pneumothorax")
# Normal statements and the classes each one denies.
IMPLIED_ABSENT: dict[str, tuple[str, ...]] = {
    "lungs are clear": _LUNG, "clear lungs": _LUNG, "lungs appear clear": _LUNG, "expanded and clear": _LUNG,
    "heart size is normal": ("Cardiomegaly",), "normal heart size": ("Cardiomegaly",),
    "within normal limits": ("Cardiomegaly",), "silhouette is normal": ("Cardiomegaly",),
    "normal in size": ("Cardiomegaly",), "size within normal": ("Cardiomegaly",),
    "vascularity is normal": ("Edema",), "vasculature is normal": ("Edema",),
    "osseous": ("Fracture",),
    "cardiopulmonary": tuple(CLASSES[1:]), "normal chest": tuple(CLASSES[1:]), "active disease": tuple(CLASSES[1:]),
    "acute findings": tuple(CLASSES[1:]), "normal radiographic": tuple(CLASSES[1:]),
    "evidence of acute disease": tuple(CLASSES[1:]),
}

_SEVERITY_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "markedly"}
_SEVERITY_ADJ = {"mild": "mild", "moderate": "moderate", "severe": "marked"}
_CONSOLIDATION_ADJ = {"small": ("focal", "small"), "moderate": ("patchy", "moderate"), "large": ("extensive", "dense")}
_LOBE = {("right", "upper"): "right upper lobe", ("right", "mid"): "right middle lobe",
         ("right", "lower"): "right lower lobe", ("left", "upper"): "left upper lobe",
         ("left", "mid"): "lingular segment of the left upper lobe", ("left", "lower"): "left lower lobe"}
_RANK = {"": 0, "small": 0, "mild": 0, "moderate": 1, "large": 2, "severe": 2}
_NEGATE_P = {"Cardiomegaly": 0.7, "Pleural Effusion": 0.7, "Pneumothorax": 0.7, "Consolidation": 0.6,
             "Edema": 0.3, "Nodule": 0.3, "Atelectasis": 0.2, "Calcified Granuloma": 0.1, "Scoliosis": 0.1,
             "Support Devices": 0.15, "Fracture": 0.2}
_NOUN = {"Pleural Effusion": "{side} pleural effusion", "Consolidation": "{side} {zone} zone consolidation",
         "Atelectasis": "atelectasis", "Edema": "pulmonary edema", "Pneumothorax": "{side} pneumothorax",
         "Fracture": "{side} rib fracture"}
# FINDINGS runs devices, lungs, pleura, heart, bones; IMPRESSION leads with the most urgent.
_FINDINGS_ORDER = ("Support Devices", "Consolidation", "Atelectasis", "Edema", "Nodule", "Calcified Granuloma",
                   "Pleural Effusion", "Pneumothorax", "Cardiomegaly", "Scoliosis", "Fracture")
_IMPRESSION_ORDER = ("Pneumothorax", "Consolidation", "Edema", "Pleural Effusion", "Atelectasis", "Cardiomegaly",
                     "Fracture", "Nodule", "Support Devices", "Calcified Granuloma", "Scoliosis")
HEDGE_P = 0.3  # fraction of subtle findings reported with uncertainty


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def is_subtle(f: Finding) -> bool:
    """Findings a radiologist may report with uncertainty: small / mild ones and rib fractures."""
    return f.severity in SUBTLE or f.name == "Fracture"


def template_key(f: Finding) -> str:
    """Which template group words this finding."""
    p = f.params
    if f.name == "Pleural Effusion" and f.side == "bilateral":
        return "Pleural Effusion/bilateral"
    if f.name == "Atelectasis":
        return "Atelectasis/bibasilar" if f.side == "bilateral" else f"Atelectasis/{p['kind']}"
    if f.name == "Edema":
        return "Edema/mild" if f.severity == "mild" else "Edema"
    if f.name == "Support Devices":
        malposed = p["device"] == "ng" and p.get("tip_site") != "stomach"
        return "Support Devices/ng-malposition" if malposed else f"Support Devices/{p['device']}"
    if f.name == "Fracture":
        return f"Fracture/{p['kind']}"
    return f.name


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _fields(f: Finding, rng: np.random.Generator) -> dict[str, str]:
    p, sev = f.params, f.severity
    fields = {"side": f.side, "zone": f.zone, "sev": sev, "sevadv": _SEVERITY_ADVERB.get(sev, sev),
              "lobe": _LOBE.get((f.side, f.zone), ""), "adj": _pick(rng, _CONSOLIDATION_ADJ.get(sev, (sev,)))}
    if f.name == "Cardiomegaly":
        fields["sev"] = _SEVERITY_ADJ[sev]
    if f.name == "Fracture":
        fields["rib"] = _ordinal(int(p["rib"]) + 2)
    if f.name == "Scoliosis":
        fields.update(dir=p["convexity"], convex="dextroconvex" if p["convexity"] == "right" else "levoconvex",
                      curve="S-shaped " if p.get("s_curve") else "")
    if f.name == "Support Devices":
        fields.update(tip_cm=f"{float(p.get('tip_cm', 0)):g}", tip_site=p.get("tip_site", ""), vein=p.get("vein", ""))
    fields.update({k[:1].upper() + k[1:]: _cap(v) for k, v in list(fields.items())})
    return fields


def _sentence(template: str, fields: dict[str, str]) -> str:
    return _cap(template.format(**fields))


def _comparison(f: Finding, prior: list[Finding], pool: dict, rng: np.random.Generator) -> str:
    same = [g for g in prior if g.name == f.name and (f.name != "Support Devices" or g.params["device"] == f.params["device"])]
    if not same:
        return _pick(rng, pool["cmp_new"])
    before = max(_RANK.get(g.severity, 0) for g in same)
    now = _RANK.get(f.severity, 0)
    return _pick(rng, pool["cmp_same" if now == before else ("cmp_up" if now > before else "cmp_down")])


def build_report(findings: list[Finding], rng: np.random.Generator, prior: list[Finding] | None = None,
                 held_out: bool = False) -> tuple[str, str]:
    """(FINDINGS text, IMPRESSION text) for one study, headings excluded.

    ``prior``: the previous study's findings of the same subject (adds comparison phrases);
    ``held_out``: word the report from the held-out template pool (test split).
    """
    pool = POOLS["heldout" if held_out else "train"]
    by_name: dict[str, list[Finding]] = {}
    for f in findings:
        by_name.setdefault(f.name, []).append(f)
    prior_names = {g.name for g in prior} if prior else set()
    hedged = {id(f) for f in findings
              if is_subtle(f) and "hedge" in pool[template_key(f)] and rng.random() < HEDGE_P}
    fields = {id(f): _fields(f, rng) for f in findings}

    sentences: list[str] = []
    if not any(n in by_name for n in _LUNG) and rng.random() < 0.6:
        sentences.append(_pick(rng, pool["clear_lungs"]))
    negate_pleura = "Pleural Effusion" not in by_name and "Pneumothorax" not in by_name and rng.random() < 0.5
    for name in _FINDINGS_ORDER:
        for f in by_name.get(name, ()):
            group = pool[template_key(f)]
            sentences.append(_sentence(_pick(rng, group["hedge" if id(f) in hedged else "pos"]), fields[id(f)]))
            if prior is not None and id(f) not in hedged and rng.random() < 0.8:
                sentences.append(_comparison(f, prior, pool, rng))
        if name in by_name:
            continue
        if name in prior_names and name in _NOUN and rng.random() < 0.7:
            gone = next(g for g in prior if g.name == name)
            noun = _NOUN[name].format(side=gone.side, zone=gone.zone).strip()
            sentences.append(_sentence(_pick(rng, pool["cmp_resolved"]), {"noun": noun}))
        elif name in ("Pleural Effusion", "Pneumothorax") and negate_pleura:
            if name == "Pleural Effusion":
                sentences.append(_pick(rng, pool["neg_pleura"]))
        elif name == "Edema" and rng.random() < 0.15:
            sentences.append(_pick(rng, pool["normal_vessels"]))
        elif rng.random() < _NEGATE_P[name]:
            sentences.append(_pick(rng, pool["neg"][name]))
    if "Fracture" not in by_name and rng.random() < 0.5:
        sentences.append(_pick(rng, pool["bones"]))
    if not sentences:  # a normal study with nothing drawn above still gets a FINDINGS section
        sentences.append(_pick(rng, pool["clear_lungs"]))

    if findings:
        impression = []
        for name in _IMPRESSION_ORDER:
            for f in by_name.get(name, ()):
                group = pool[template_key(f)]
                key = "himpr" if id(f) in hedged and "himpr" in group else "impr"
                impression.append(_sentence(_pick(rng, group[key]), fields[id(f)]))
        return " ".join(sentences), " ".join(impression)
    return " ".join(sentences), _pick(rng, pool["normal_impression"])


# ------------------------------------------------------------------------------------ contract
def sentences(text: str) -> list[str]:
    """Split a report section into sentences (a period followed by white space ends one)."""
    return [t.strip() for t in re.split(r"(?<=\.)\s+", text) if t.strip()]


def classes_named(sentence: str) -> set[str]:
    low = sentence.lower()
    return {c for c, words in KEYWORDS.items() if any(w in low for w in words)}


def polarity(sentence: str) -> str:
    """"hedged", "negated" or "positive" (what a sentence says of the classes it names)."""
    low = " " + sentence.lower()
    if any(cue in low for cue in HEDGE_CUES):
        return "hedged"
    if low[1:].startswith(NEGATION_PREFIXES) or any(cue in low for cue in NEGATION_CUES):
        return "negated"
    return "positive"


def report_contract(findings_text: str, impression: str, findings: list[Finding] | list[dict]) -> list[str]:
    """Violations of the report-label contract (empty list: the report agrees with ``findings``).

    ``findings``: the study's :class:`Finding` objects or its ``meta["findings"]`` records
    (dicts with at least ``name`` and ``severity``).
    """
    records = [f if isinstance(f, Finding) else Finding(f["name"], f.get("side", ""), f.get("zone", ""),
                                                         f.get("severity", "")) for f in findings]
    present = {f.name for f in records}
    subtle = {f.name for f in records if is_subtle(f)}
    problems: list[str] = []
    for section, text in (("FINDINGS", findings_text), ("IMPRESSION", impression)):
        affirmed: set[str] = set()
        for s in sentences(text):
            named, mode, low = classes_named(s), polarity(s), s.lower()
            for c in named:
                if mode == "negated" and c in present:
                    problems.append(f"{section}: {s!r} negates present {c}")
                elif mode != "negated" and c not in present:
                    problems.append(f"{section}: {s!r} affirms absent {c}")
                elif mode == "hedged" and c not in subtle:
                    problems.append(f"{section}: {s!r} hedges {c}, which is not subtle")
            if mode != "negated":
                affirmed |= named & present
            for phrase, denied in IMPLIED_ABSENT.items():
                if phrase in low and present & set(denied):
                    problems.append(f"{section}: {s!r} implies {sorted(present & set(denied))} absent")
        for c in sorted(present - affirmed):
            problems.append(f"{section}: present {c} is not mentioned")
    if not findings_text.strip() or not impression.strip():
        problems.append("empty section")
    return problems


__all__ = ["KEYWORDS", "NEGATION_PREFIXES", "ZONES", "build_report", "polarity", "report_contract", "sentences"]
