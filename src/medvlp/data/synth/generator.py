"""``generate``: write a SynthCXR dataset (PNG images, masks, manifest, optional shards).

Every random draw comes from a generator keyed by what it is for, never from a shared
stream, so the output does not depend on iteration order or on the number of worker
processes, and any one study can be re-rendered on its own:

==========================================  ==============================================
``default_rng([seed, 0, subject])``         anatomy, chronic findings, number of studies
``default_rng([seed, 1, subject, study])``  acquisition, acute findings, report wording
``default_rng([seed, 2])``                  assignment of subjects to splits
``default_rng([seed, 3, subject, study])``  VQA question sampling
==========================================  ==============================================

The same seed gives byte-identical PNGs, masks and manifest; nothing time-dependent is
written. Splits are by subject (:data:`SPLITS`): ``pretrain`` (image + report),
``pretrain-unpaired`` (images only), ``pretrain-labeled`` (images + labels, no report) and
the downstream ``train`` / ``val`` / ``test`` splits; the test split's reports use a
held-out set of phrasings and its subjects are never in any pre-training split.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medvlp.data.manifest import write_manifest
from medvlp.data.sample import NEGATIVE, POSITIVE, Sample
from medvlp.data.synth.anatomy import Anatomy, sample_anatomy
from medvlp.data.synth.findings import (
    CLASSES,
    Finding,
    labels_for,
    sample_acute,
    sample_chronic,
)
from medvlp.data.synth.render import (
    Acquisition,
    finding_meta,
    render_study,
    sample_acquisition,
)
from medvlp.data.synth.reports import build_report
from medvlp.data.synth.vqa import vqa_pairs
from medvlp.errors import ConfigError

GENERATOR_VERSION = "2.0.0"
SPLITS = ("pretrain", "pretrain-unpaired", "pretrain-labeled", "train", "val", "test")
PRETRAIN_SPLITS = ("pretrain", "pretrain-unpaired", "pretrain-labeled")
DEFAULT_SPLIT_FRACTIONS = {"pretrain": 0.45, "pretrain-unpaired": 0.15, "pretrain-labeled": 0.10,
                           "train": 0.12, "val": 0.04, "test": 0.14}
REPORT_SPLITS = frozenset({"pretrain", "train", "val", "test"})  # splits whose studies get a report
HELD_OUT_SPLITS = frozenset({"test"})  # reports written with the held-out phrasings


@dataclass(frozen=True)
class Preset:
    subjects: int
    studies_per_subject: tuple[int, int]
    image_size: int
    description: str


PRESETS = {
    "small": Preset(400, (1, 3), 64, "smoke set: ~800 images at 64 px, seconds to generate"),
    "standard": Preset(5000, (1, 3), 128, "the benchmark: ~10k images at 128 px, minutes to generate"),
    "large": Preset(50000, (1, 4), 224, "scale test: ~125k images at 224 px"),
}


def frozen_versions() -> dict:
    """Frozen benchmark versions: name -> generator version, preset, seed and manifest hash."""
    path = resources.files("medvlp.data.synth") / "frozen.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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


def assign_splits(subjects: int, seed: int, fractions: Mapping[str, float]) -> list[str]:
    """Split name of every subject: a seeded shuffle cut at the cumulative fractions.
    The first split takes the rounding remainder; on tiny datasets every split asked for
    still gets a subject while there are enough to go round."""
    names = list(fractions)
    counts = [int(round(fractions[n] * subjects)) for n in names]
    counts[0] = subjects - sum(counts[1:])
    for k in range(1, len(names)):
        if fractions[names[k]] > 0 and counts[k] == 0 and counts[0] > 1:
            counts[k], counts[0] = 1, counts[0] - 1
    order = np.random.default_rng([seed, 2]).permutation(subjects)
    labels = np.repeat(np.array(names), counts)
    split_of = [""] * subjects
    for rank, subject in enumerate(order):
        split_of[int(subject)] = str(labels[rank])
    return split_of


def mask_bits(masks: Mapping[str, np.ndarray], threshold: float = 0.5) -> np.ndarray:
    """One uint16 image whose bit ``k`` marks the pixels of class ``CLASSES[k]``."""
    shape = next(iter(masks.values())).shape if masks else (1, 1)
    bits = np.zeros(shape, dtype=np.uint16)
    for name, m in masks.items():
        bits |= (np.asarray(m) >= threshold).astype(np.uint16) << np.uint16(CLASSES.index(name))
    return bits


def decode_mask(path: str | os.PathLike, classes: Sequence[str] = CLASSES) -> dict[str, np.ndarray]:
    """Read a mask PNG written by the generator: ``{class: bool (H, W)}`` for every class."""
    bits = np.asarray(Image.open(path)).astype(np.int64)
    return {c: (bits >> CLASSES.index(c)) & 1 == 1 for c in classes}


@dataclass(frozen=True)
class _Job:
    out: str
    seed: int
    studies_per_subject: tuple[int, int]
    image_size: int
    id_width: int
    masks: bool


def _study_sample(job: _Job, subject: Subject, study_index: int, split: str) -> Sample:
    """Render, save and describe one synthetic study."""
    study = make_study(job.seed, subject, study_index)
    if split in REPORT_SPLITS:
        prior = make_study(job.seed, subject, study_index - 1).findings if study_index > 0 else None
        findings_text, impression = build_report(study.findings, study.rng, prior=prior,
                                                 held_out=split in HELD_OUT_SPLITS)
    else:
        findings_text, impression = "", ""
    subject_id = f"S{subject.index:0{job.id_width}d}"
    return render_sample(job, subject_id, study_index, subject.anatomy, study.acquisition, study.findings, split,
                         findings_text, impression, np.random.default_rng([job.seed, 3, subject.index, study_index]))


def render_sample(job: _Job, subject_id: str, study_index: int, anatomy: Anatomy, acq: Acquisition,
                  findings: list[Finding], split: str, findings_text: str, impression: str,
                  vqa_rng: np.random.Generator, vqa_records=None, extra_meta: dict | None = None) -> Sample:
    """Render, save and describe one study with the given findings and report text.
    ``vqa_records`` (default: the finding records) are what the VQA questions are asked about."""
    out, size = Path(job.out), job.image_size
    rendering = render_study(anatomy, acq, findings, size)
    study_id = f"{subject_id}-T{study_index:02d}"
    path = out / "images" / subject_id / f"{study_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rendering.image).save(path, format="PNG")

    present = labels_for(findings)
    records = [finding_meta(f, rendering.instance_masks[i], acq, size) for i, f in enumerate(findings)]
    meta = {
        "generator_version": GENERATOR_VERSION,
        "study_index": study_index,
        "findings": records,
        "acquisition": {"view": acq.view, "rotation_deg": round(float(np.degrees(acq.rotation)), 2),
                        "contrast": round(acq.contrast, 3), "noise": round(acq.noise_sigma, 4)},
        "image_sha256": hashlib.sha256(rendering.image.tobytes()).hexdigest(),
        "vqa": vqa_pairs(records if vqa_records is None else vqa_records(records), CLASSES, vqa_rng),
        **(extra_meta or {}),
    }
    if job.masks:
        mask_rel = Path("masks") / subject_id / f"{study_id}.png"
        (out / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask_bits(rendering.masks) if rendering.masks
                        else np.zeros((size, size), np.uint16)).save(out / mask_rel, format="PNG")
        meta["mask"] = mask_rel.as_posix()
    return Sample(
        id=study_id, subject_id=subject_id, study_id=study_id, split=split, image=str(path.resolve()),
        view=acq.view, findings=findings_text, impression=impression,
        labels={c: POSITIVE if present[c] else NEGATIVE for c in CLASSES}, meta=meta,
    )


def _subject_samples(args: tuple[_Job, int, str]) -> list[Sample]:
    job, index, split = args
    subject = make_subject(job.seed, index, job.studies_per_subject)
    return [_study_sample(job, subject, k, split) for k in range(subject.n_studies)]


def _fractions(split_fractions) -> dict[str, float]:
    if split_fractions is None:
        return dict(DEFAULT_SPLIT_FRACTIONS)
    if isinstance(split_fractions, Mapping):
        unknown = set(split_fractions) - set(SPLITS)
        if unknown:
            raise ConfigError(f"synth split_fractions: unknown split(s) {sorted(unknown)}; known: {list(SPLITS)}")
        return {name: float(split_fractions.get(name, 0.0)) for name in SPLITS}
    values = [float(v) for v in split_fractions]
    if len(values) != len(SPLITS):
        raise ConfigError(f"synth split_fractions: got {len(values)} values; give {len(SPLITS)} fractions for "
                          f"{list(SPLITS)} or a mapping split -> fraction")
    return dict(zip(SPLITS, values))


def _validate(subjects: int, studies_per_subject: tuple[int, int], image_size: int, seed: int,
              fractions: dict[str, float], workers: int, shard_size: int) -> None:
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
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConfigError(f"synth split_fractions: got {fractions}; give non-negative fractions summing to 1")
    if fractions["test"] <= 0:
        raise ConfigError("synth split_fractions: the test split needs a positive fraction")
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ConfigError(f"synth workers: got {workers!r}; give 0 (all cores) or a positive integer")
    if shard_size < 1:
        raise ConfigError(f"synth shard_size: got {shard_size!r}; give a positive integer (e.g. 1000)")


def generate(out: str | Path, *, preset: str | None = None, subjects: int | None = None,
             studies_per_subject: tuple[int, int] | None = None, image_size: int | None = None,
             seed: int = 0, split_fractions=None, masks: bool = True, workers: int = 1,
             shards: bool = False, shard_size: int = 1000, progress: bool = True,
             real_reports: str | Path | None = None) -> Path:
    """Write a SynthCXR dataset to ``out`` and return its manifest path.

    ``preset`` (``small`` / ``standard`` / ``large``) sets subjects, studies and image size;
    explicit arguments override it (and the result is then not the frozen benchmark).
    Layout: ``images/<subject>/<study>.png`` (8-bit grayscale), ``masks/<subject>/<study>.png``
    (16-bit, bit k = class k, see :func:`decode_mask`), ``manifest.jsonl``, ``dataset.json``
    and, with ``shards=True``, webdataset-style tars in ``shards/``. ``workers`` processes
    render in parallel (0 = one per core); the output does not depend on it.
    ``real_reports``: None (off), ``"iu"`` (the IU reports from the cached torchxrayvision
    wheel) or a wheel / ``NLMCXR_reports.tgz`` path: each IU report becomes one extra subject
    (``IU<id>``), rendered from the findings it states, after the synthetic ones
    (:mod:`medvlp.data.synth.real`).
    """
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"synth preset: got {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset] if preset else Preset(200, (1, 4), 64, "")
    custom = (any(v is not None for v in (subjects, studies_per_subject, image_size)) or split_fractions is not None
              or real_reports is not None)
    subjects = base.subjects if subjects is None else subjects
    studies_per_subject = tuple(base.studies_per_subject if studies_per_subject is None else studies_per_subject)
    image_size = base.image_size if image_size is None else image_size
    fractions = _fractions(split_fractions)
    _validate(subjects, studies_per_subject, image_size, seed, fractions, workers, shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split_of = assign_splits(subjects, seed, fractions)
    job = _Job(str(out), int(seed), (int(studies_per_subject[0]), int(studies_per_subject[1])), int(image_size),
               max(5, len(str(subjects - 1))), bool(masks))
    jobs = [(job, index, split_of[index]) for index in range(subjects)]
    workers = workers or (os.cpu_count() or 1)
    real_set = None
    if real_reports is not None:
        from medvlp.data.synth import real

        real_set = real.prepare_real(real_reports, int(seed), fractions)
    real_jobs = [(job, case, split) for case, split in zip(real_set.cases, real_set.splits)] if real_set else []

    samples: list[Sample] = []
    bar = tqdm(total=subjects + len(real_jobs), desc="synthcxr", unit="subject", disable=not progress)
    if workers == 1:
        results = map(_subject_samples, jobs)
        for chunk in results:
            samples.extend(chunk)
            bar.update(1)
        for sample in map(real.case_sample, real_jobs) if real_jobs else ():
            samples.append(sample)
            bar.update(1)
    else:  # spawn: no fork of a process that may hold torch / OpenMP threads
        with mp.get_context("spawn").Pool(workers) as pool:
            for chunk in pool.imap(_subject_samples, jobs, chunksize=max(1, min(32, subjects // (8 * workers)))):
                samples.extend(chunk)
                bar.update(1)
            if real_jobs:
                for sample in pool.imap(real.case_sample, real_jobs, chunksize=max(1, min(32, len(real_jobs) // (8 * workers)))):
                    samples.append(sample)
                    bar.update(1)
    bar.close()

    name = benchmark_name(preset, seed) if preset and not custom else None
    info = {
        "name": "synthcxr",
        "version": GENERATOR_VERSION,
        "preset": preset if preset and not custom else None,
        "benchmark": name,  # confirmed (or cleared) against frozen.json below
        "classes": list(CLASSES),
        "subjects": int(subjects),
        "studies_per_subject": [int(v) for v in studies_per_subject],
        "image_size": int(image_size),
        "seed": int(seed),
        "split_fractions": fractions,
        "splits": {"pretraining": list(PRETRAIN_SPLITS), "downstream": ["train", "val", "test"],
                   "with_reports": sorted(REPORT_SPLITS), "held_out_phrasings": sorted(HELD_OUT_SPLITS)},
        "views": ["PA", "AP"],
        "laterality": "patient side; frontal views show the patient's right on the image left",
        "label_codes": {"positive": POSITIVE, "negative": NEGATIVE},
        "masks": "masks/<subject>/<study>.png: uint16, bit k set where class k (classes order) is present"
                 if masks else None,
    }
    if real_set is not None:  # only when on, so the default dataset.json stays byte-identical
        info["real_reports"] = real_set.info
    manifest = write_manifest(out, samples, info)
    if shards:
        from medvlp.data.shards import write_shards

        write_shards(samples, out / "shards", root=out, shard_size=shard_size, prefix="synthcxr")
    _check_frozen(out, name)
    return manifest


def benchmark_name(preset: str | None, seed: int) -> str | None:
    """The frozen benchmark this (preset, seed) produces with this generator version, if any."""
    for key, v in frozen_versions().items():
        if v["preset"] == preset and v["seed"] == seed and v["generator_version"] == GENERATOR_VERSION:
            return key
    return None


def _check_frozen(out: Path, name: str | None) -> None:
    """A preset's output must match its frozen hash: a generator change that alters the
    output must bump GENERATOR_VERSION instead of silently changing a benchmark."""
    if name is None:
        return
    frozen = frozen_versions()[name]
    info_path = out / "dataset.json"
    info = json.loads(info_path.read_text())
    if info["manifest_sha256"] != frozen["manifest_sha256"]:
        import warnings

        warnings.warn(f"synthcxr: this output differs from the frozen {name} (manifest hash "
                      f"{info['manifest_sha256'][:12]} != {frozen['manifest_sha256'][:12]}); it is not {name}. "
                      "If the generator changed on purpose, bump GENERATOR_VERSION and freeze a new version.")
        info["benchmark"] = None
        tmp = info_path.with_name(info_path.name + ".tmp")
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, info_path)
