"""``generate``: write a SynthCXR dataset (PNG images + manifest) from one seed.

Every random draw comes from a generator keyed by what it is for, never from a shared
stream, so the output does not depend on iteration order and any one study can be
re-rendered on its own:

==========================================  ==============================================
``default_rng([seed, 0, subject])``         anatomy, chronic findings, number of studies
``default_rng([seed, 1, subject, study])``  acquisition, acute findings, report wording
``default_rng([seed, 2])``                  assignment of subjects to splits
==========================================  ==============================================

The same seed gives byte-identical PNGs and manifest; nothing time-dependent is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medvlp.data.manifest import write_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE, Sample
from medvlp.data.synth.anatomy import Anatomy, sample_anatomy
from medvlp.data.synth.findings import CLASSES, Finding, labels_for, sample_acute, sample_chronic
from medvlp.data.synth.render import Acquisition, mask_geometry, render_study, sample_acquisition, to_pixels
from medvlp.data.synth.reports import build_report
from medvlp.errors import ConfigError

GENERATOR_VERSION = "1.0.0"
SPLITS = ("train", "val", "test")


@dataclass
class Subject:
    index: int
    anatomy: Anatomy
    chronic: list[Finding]
    n_studies: int


@dataclass
class Study:
    subject: Subject
    index: int
    acquisition: Acquisition
    findings: list[Finding]
    rng: np.random.Generator  # continues the study's stream (report wording)


def make_subject(seed: int, index: int, studies_per_subject: tuple[int, int]) -> Subject:
    rng = np.random.default_rng([seed, 0, index])
    anatomy = sample_anatomy(rng)
    chronic = sample_chronic(rng, anatomy)
    lo, hi = studies_per_subject
    return Subject(index, anatomy, chronic, int(rng.integers(lo, hi + 1)))


def make_study(seed: int, subject: Subject, index: int) -> Study:
    rng = np.random.default_rng([seed, 1, subject.index, index])
    acquisition = sample_acquisition(rng)
    findings = list(subject.chronic) + sample_acute(rng, subject.anatomy, subject.chronic)
    return Study(subject, index, acquisition, findings, rng)


def assign_splits(subjects: int, seed: int, fractions: tuple[float, float, float]) -> list[str]:
    """Split name of every subject: a seeded shuffle cut at the cumulative fractions."""
    order = np.random.default_rng([seed, 2]).permutation(subjects)
    counts = [int(round(f * subjects)) for f in fractions]
    counts[0] = subjects - counts[1] - counts[2]
    # Tiny datasets: a split asked for still gets a subject when there are enough to go round.
    for k in (1, 2):
        if fractions[k] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k], counts[0] = 1, counts[0] - 1
    names = np.repeat(np.array(SPLITS), counts)
    split_of = [""] * subjects
    for rank, subject in enumerate(order):
        split_of[int(subject)] = str(names[rank])
    return split_of


def _finding_meta(f: Finding, mask: np.ndarray | None, acq: Acquisition, size: int) -> dict:
    meta: dict = {"name": f.name, "side": f.side, "zone": f.zone, "severity": f.severity}
    if mask is not None:
        meta.update(mask_geometry(mask))
    if f.name == "Nodule":
        cx, cy = to_pixels(acq, float(f.params["x"]), float(f.params["y"]), size)
        meta["center"] = [round(cx, 2), round(cy, 2)]
        meta["radius"] = round(float(f.params["radius"]) * acq.magnification * size / 2.0, 2)
    if f.name == "Cardiomegaly":
        meta["ctr"] = round(float(f.params["ctr"]), 3)
    return meta


def study_sample(out: Path, seed: int, subject: Subject, study_index: int, image_size: int,
                 split: str, id_width: int) -> Sample:
    """Render, save and describe one study."""
    study = make_study(seed, subject, study_index)
    rendering = render_study(subject.anatomy, study.acquisition, study.findings, image_size)
    subject_id = f"S{subject.index:0{id_width}d}"
    study_id = f"{subject_id}-T{study_index:02d}"
    path = out / "images" / subject_id / f"{study_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rendering.image).save(path, format="PNG")

    findings_text, impression = build_report(study.findings, study.rng)
    present = labels_for(study.findings)
    acq = study.acquisition
    meta = {
        "generator_version": GENERATOR_VERSION,
        "findings": [_finding_meta(f, rendering.masks.get(f.name), acq, image_size) for f in study.findings],
        "ctr": round(float(next((f.params["ctr"] for f in study.findings if f.name == "Cardiomegaly"),
                                subject.anatomy.heart_ctr)), 3),
        "acquisition": {"rotation_deg": round(float(np.degrees(acq.rotation)), 2),
                        "contrast": round(acq.contrast, 3), "noise": round(acq.noise_sigma, 4)},
    }
    return Sample(
        id=study_id, subject_id=subject_id, study_id=study_id, split=split, image=str(path.resolve()),
        view=acq.view, findings=findings_text, impression=impression,
        labels={c: POSITIVE if present[c] else NEGATIVE for c in CLASSES}, meta=meta,
    )


def _validate(subjects: int, studies_per_subject: tuple[int, int], image_size: int, seed: int,
              split_fractions: tuple[float, float, float]) -> None:
    if not isinstance(subjects, (int, np.integer)) or subjects < 1:
        raise ConfigError(f"synth subjects: got {subjects!r}; give a positive integer (e.g. --subjects 200)")
    if (len(studies_per_subject) != 2 or not all(isinstance(v, (int, np.integer)) for v in studies_per_subject)
            or not 1 <= studies_per_subject[0] <= studies_per_subject[1]):
        raise ConfigError(f"synth studies_per_subject: got {studies_per_subject!r}; give (min, max) "
                          "integers with 1 <= min <= max, e.g. (1, 4)")
    if not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
        raise ConfigError(f"synth image_size: got {image_size!r}; give an integer in [16, 1024] (e.g. 64)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synth seed: got {seed!r}; give a non-negative integer")
    if (len(split_fractions) != 3 or any(f < 0 for f in split_fractions)
            or abs(sum(split_fractions) - 1.0) > 1e-6):
        raise ConfigError(f"synth split_fractions: got {split_fractions!r}; give three non-negative "
                          "fractions (train, val, test) summing to 1, e.g. (0.7, 0.1, 0.2)")


def generate(out: str | Path, *, subjects: int = 200, studies_per_subject: tuple[int, int] = (1, 4),
             image_size: int = 64, seed: int = 0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
             progress: bool = True) -> Path:
    """Write a SynthCXR dataset to ``out`` and return its manifest path.

    Layout: ``out/images/<subject>/<study>.png`` (8-bit grayscale), ``out/manifest.jsonl``
    and ``out/dataset.json``. ``studies_per_subject`` is an inclusive (min, max) range.
    Splits are by subject. Images from an earlier, larger run in the same folder are not
    removed, but only this run's images are in the manifest.
    """
    studies_per_subject = tuple(studies_per_subject)  # type: ignore[assignment]
    split_fractions = tuple(float(f) for f in split_fractions)  # type: ignore[assignment]
    _validate(subjects, studies_per_subject, image_size, seed, split_fractions)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split_of = assign_splits(subjects, seed, split_fractions)
    id_width = max(5, len(str(subjects - 1)))

    samples: list[Sample] = []
    for index in tqdm(range(subjects), desc="synthcxr", unit="subject", disable=not progress):
        subject = make_subject(seed, index, studies_per_subject)
        for study_index in range(subject.n_studies):
            samples.append(study_sample(out, seed, subject, study_index, image_size, split_of[index], id_width))

    info = {
        "name": "synthcxr",
        "version": GENERATOR_VERSION,
        "classes": list(CLASSES),
        "subjects": int(subjects),
        "studies_per_subject": [int(v) for v in studies_per_subject],
        "image_size": int(image_size),
        "seed": int(seed),
        "split_fractions": list(split_fractions),
        "views": ["PA", "AP"],
        "laterality": "patient side; frontal views show the patient's right on the image left",
        "label_codes": {"positive": POSITIVE, "negative": NEGATIVE},
    }
    return write_manifest(out, samples, info)
