"""Real reports, synthetic images: each Indiana University (IU) report rendered as a SynthCXR study.

For every IU report with text (FINDINGS or IMPRESSION after :func:`iu.clean_placeholders`),
the findings it states are read from its coded ``<major>`` MeSH tags through the fixed
mapping (:func:`iu.mesh_findings`: class, side, zone, severity from the tag modifiers); a
side, zone or severity the tag lacks is taken from the report's own sentences by a few word
rules (:func:`text_hints`). Each stated finding is then drawn with
:func:`findings.make_finding`, in a fixed class order, under the occupancy rule of
SynthCXR (two lung findings never share a cell); a finding that cannot be placed is dropped
and recorded. Headings outside the mapping (e.g. "Opacity") are not drawn, so the text may
mention more than the image shows; the labels always describe the image.

Randomness: anatomy, acquisition and finding geometry of report ``CXR<n>`` come from
``default_rng([seed, 4, n])`` and its VQA questions from ``default_rng([seed, 4, n, 1])``,
so a case does not depend on the other reports nor on the synthetic subjects; splits come
from ``default_rng([seed, 5])``. Licence: the report text is read at run time and written only
into the generated dataset, never into this repository.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvlp.data import iu
from medvlp.data.labeler import ReportLabeler
from medvlp.data.sample import Sample
from medvlp.data.synth.anatomy import Anatomy, sample_anatomy
from medvlp.data.synth.findings import Finding, make_finding
from medvlp.data.synth.generator import REPORT_SPLITS, SPLITS, render_sample
from medvlp.data.synth.render import Acquisition, sample_acquisition
from medvlp.errors import ConfigError

ONE_SIDED = ("Nodule", "Calcified Granuloma", "Consolidation", "Pneumothorax", "Fracture")  # bilateral = one per side
# Placement order: what sets the heart size first, then what occupies the most lung.
PLACE_ORDER = ("Cardiomegaly", "Scoliosis", "Support Devices", "Edema", "Pleural Effusion", "Pneumothorax",
               "Consolidation", "Atelectasis", "Nodule", "Calcified Granuloma", "Fracture")
TEXT_CUES = {
    "Cardiomegaly": r"cardiomegaly|heart size|heart is|cardiac silhouette|cardiac enlargement|enlarged heart",
    "Pleural Effusion": r"effusion", "Consolidation": r"consolidat|air ?space|pneumonia|infiltrat",
    "Atelectasis": r"atelecta", "Edema": r"edema|congesti", "Nodule": r"nodul", "Calcified Granuloma": r"granulom",
    "Pneumothorax": r"pneumothora", "Scoliosis": r"scolio|curvature", "Fracture": r"fractur",
}
_NEGATED = re.compile(r"\b(?:no|without|negative for|resolved)\b")
_SIDE = [("bilateral", r"\b(?:bilateral(?:ly)?|bibasilar|bibasal|both)\b"), ("left", r"\bleft\b|\blevo"),
         ("right", r"\bright\b|\bdextro")]
_ZONE = [("upper", r"\b(?:upper|apex|apices|apical)\b"), ("mid", r"\b(?:middle lobe|lingula\w*|mid|perihilar)\b"),
         ("lower", r"\b(?:lower|base|bases|basilar|bibasilar|basal|costophrenic|retrocardiac)\b")]
_SEVERITY = [("small", r"\b(?:small|tiny|trace)\b"), ("mild", r"\b(?:mild|mildly|minimal|slight|minor|borderline)\b"),
             ("moderate", r"\bmoderate(?:ly)?\b"), ("large", r"\b(?:large|extensive)\b"),
             ("severe", r"\b(?:severe|marked|markedly|massive)\b")]
# Support device kind: from the report's words first, else from the MeSH heading.
_DEVICE_WORDS = [("icd", r"defibrillator|\baicd\b|\bicd\b"), ("pacemaker", r"pacemaker|pacer|pacing"),
                 ("sternotomy", r"sternotomy|sternal wires?"), ("ett", r"endotracheal|\bet tube"),
                 ("ng", r"nasogastric|enteric|feeding tube|\bng tube"), ("picc", r"\bpicc\b"),
                 ("cvc", r"central (?:venous )?(?:line|catheter)|jugular|subclavian|port-?a-?cath|\bport\b")]
_ZONED = ("Consolidation", "Atelectasis", "Nodule", "Calcified Granuloma", "Fracture")
FILLABLE = {  # the fields the text may complete, per class: those the drawing uses
    name: tuple(k for k, ok in (("side", name not in ("Cardiomegaly", "Edema")), ("zone", name in _ZONED),
                                ("severity", name not in ("Fracture", "Calcified Granuloma"))) if ok)
    for name in PLACE_ORDER}
DEVICE_OF_HEADING = {"catheters, indwelling": "cvc", "implanted medical device": "pacemaker",
                     "medical device": "pacemaker", "tube, inserted": "ng", "surgical instruments": "sternotomy",
                     "sutures": "sternotomy", "stents": "sternotomy"}


@dataclass
class RealCase:
    """One IU report made ready to render (everything a worker needs; picklable)."""

    number: int
    subject_id: str
    findings_text: str
    impression: str
    anatomy: Anatomy
    acquisition: Acquisition
    findings: list[Finding]
    meta: dict = field(default_factory=dict)


@dataclass
class RealSet:
    cases: list[RealCase]
    splits: list[str]
    info: dict


def _first(rules: list[tuple[str, str]], sentence: str) -> str:
    """The value of the rule matching earliest in the sentence ("" if none)."""
    hits = [(m.start(), value) for value, pattern in rules for m in [re.search(pattern, sentence)] if m]
    return min(hits)[1] if hits else ""


def text_hints(text: str, name: str) -> dict[str, str]:
    """Side / zone / severity of class ``name`` from the first non-negated sentence naming it."""
    cue = TEXT_CUES.get(name)
    for sentence in re.split(r"[.;]", text.lower()) if cue else ():
        if re.search(cue, sentence) and not _NEGATED.search(sentence):
            side = _first(_SIDE, sentence)
            if side in ("left", "right") and re.search(r"\bleft\b", sentence) and re.search(r"\bright\b", sentence):
                side = "bilateral"
            return {"side": side, "zone": _first(_ZONE, sentence), "severity": _first(_SEVERITY, sentence)}
    return {"side": "", "zone": "", "severity": ""}


def _devices(report: iu.IUReport, text: str, h2c: dict[str, list[str]]) -> list[str]:
    low = text.lower()
    kinds = [kind for kind, pattern in _DEVICE_WORDS if re.search(pattern, low)]
    if "icd" in kinds and "pacemaker" in kinds:
        kinds.remove("pacemaker")  # an ICD is a pacemaker with a shock coil
    if not kinds:
        headings = [iu.mesh_heading(t).lower() for t in report.major]
        kinds = sorted({DEVICE_OF_HEADING.get(h, "pacemaker") for h in headings if "Support Devices" in h2c.get(h, [])})
    return kinds


def requested_findings(report: iu.IUReport, text: str, mapping: dict, h2c: dict) -> list[dict]:
    """What the report states, one request per drawn instance, in placement order."""
    out = []
    for f in iu.mesh_findings(report.major, mapping):
        hints = text_hints(text, f["name"])
        req = dict(f, filled=[k for k in FILLABLE.get(f["name"], ()) if not f[k] and hints[k]])
        req.update({k: hints[k] for k in req["filled"]})
        if req["name"] == "Support Devices":
            out.extend(dict(req, side="", device=kind) for kind in _devices(report, text, h2c))
        elif req["name"] in ONE_SIDED and req["side"] == "bilateral":
            out.extend(dict(req, side=s) for s in ("left", "right"))
        else:
            out.append(req)
    unique = []
    for r in out:
        if r["name"] != "Support Devices" or r not in unique:  # mesh_findings may list a device per tag
            unique.append(r)
    return sorted(unique, key=lambda r: PLACE_ORDER.index(r["name"]))


def build_case(report: iu.IUReport, seed: int, mapping: dict, h2c: dict, labeler: ReportLabeler,
               width: int = 4) -> RealCase | None:
    """The case of one report, or None if it has neither FINDINGS nor IMPRESSION text."""
    findings_text, impression = iu.clean_placeholders(report.findings), iu.clean_placeholders(report.impression)
    if not (findings_text or impression):
        return None
    number = int(re.sub(r"\D", "", report.id) or 0)
    text = " ".join(s for s in (findings_text, impression) if s)
    rng = np.random.default_rng([seed, 4, number])
    anatomy = sample_anatomy(rng)
    acquisition = sample_acquisition(rng)
    placed: list[Finding] = []
    requested, dropped = requested_findings(report, text, mapping, h2c), []
    for req in requested:
        side = req["side"] if req["name"] not in ("Cardiomegaly", "Edema") else None
        f = make_finding(rng, anatomy, req["name"], side=side or None, zone=req["zone"] or None,
                         severity=req["severity"] or None, placed=placed, device=req.get("device"))
        if f is None:
            dropped.append(dict(req, reason="occupied"))
        else:
            placed.append(f)
    meta = {"report_source": "iu", "iu_id": report.id, "mesh_major": list(report.major),
            "mesh_unmapped": sorted({h for h in report.headings if h.lower() not in h2c}),
            "requested": requested, "dropped": dropped, "report_labels": labeler.label(text)}
    return RealCase(number, f"IU{number:0{width}d}", findings_text, impression, anatomy, acquisition, placed, meta)


def split_real(n: int, seed: int, fractions: dict[str, float]) -> list[str]:
    """Split of each case: report splits only, with the fractions' relative sizes (seeded shuffle)."""
    names = [s for s in SPLITS if s in REPORT_SPLITS and fractions.get(s, 0) > 0]
    total = sum(fractions[s] for s in names)
    counts = [round(fractions[s] / total * n) for s in names]
    counts[0] = n - sum(counts[1:])
    labels = np.repeat(np.array(names), counts)
    out = [""] * n
    for rank, case in enumerate(np.random.default_rng([seed, 5]).permutation(n)):
        out[int(case)] = str(labels[rank])
    return out


def load_real_cases(source: str | Path | None = "iu", seed: int = 0) -> tuple[list[RealCase], dict]:
    """All IU cases (sampled, not rendered) and counts: reports, kept, skipped_empty, drawn, dropped."""
    if source is None or not str(source).strip():
        raise ConfigError(f"synth real_reports: got {source!r}; give 'iu' (the cached torchxrayvision wheel) "
                          "or the path of a torchxrayvision wheel or NLMCXR_reports.tgz")
    path = None if str(source).lower() == "iu" else Path(source)  # a wrong path: DataError from the reader
    reports = iu.load_iu_reports(path)
    mapping = iu.load_mesh_map()
    h2c, labeler = iu.heading_to_classes(mapping), ReportLabeler()
    width = max(4, max(len(re.sub(r"\D", "", r.id)) for r in reports))
    cases = [c for c in (build_case(r, seed, mapping, h2c, labeler, width) for r in reports) if c is not None]
    info = {
        "source": "iu" if path is None else path.name, "mesh_map_version": mapping.get("version"),
        "reports": len(reports), "kept": len(cases), "skipped_empty": len(reports) - len(cases),
        "findings_requested": sum(len(c.meta["requested"]) for c in cases),
        "findings_drawn": sum(len(c.findings) for c in cases),
        "findings_dropped": sum(len(c.meta["dropped"]) for c in cases),
        "licence": "IU / NLMCXR reports: CC BY-NC-ND 4.0 (non-commercial, no derivatives)",
        "held_out_phrasings": "not applied: IU test-split reports are real text",
    }
    return cases, info


def prepare_real(source: str | Path, seed: int, fractions: dict[str, float]) -> RealSet:
    """Cases, their splits and the dataset.json summary, for :func:`generator.generate`."""
    cases, info = load_real_cases(source, seed)
    splits = split_real(len(cases), seed, fractions)
    info["split_counts"] = {s: splits.count(s) for s in SPLITS if s in splits}
    return RealSet(cases, splits, info)


def merge_records(records: list[dict]) -> list[dict]:
    """One record per class for VQA: instances on both sides read as bilateral (a question
    about "the nodule" then has one true answer)."""
    merged: dict[str, dict] = {}
    for r in records:
        if r["name"] not in merged:
            merged[r["name"]] = dict(r)
            continue
        m = merged[r["name"]]
        for key in ("side", "zone", "severity"):
            if m.get(key) != r.get(key):
                sided = key == "side" and {m.get(key), r.get(key)} <= {"left", "right", "bilateral"}
                m[key] = "bilateral" if sided else ""
    return list(merged.values())


def case_sample(args: tuple) -> Sample:
    """Render one case (a worker task of :func:`generator.generate`)."""
    job, case, split = args
    return render_sample(job, case.subject_id, 0, case.anatomy, case.acquisition, case.findings, split,
                         case.findings_text, case.impression, np.random.default_rng([job.seed, 4, case.number, 1]),
                         vqa_records=merge_records, extra_meta=case.meta)
