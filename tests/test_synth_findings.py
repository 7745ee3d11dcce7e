"""SynthCXR findings: prevalences, visibility of every labelled finding inside its mask, AP look."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp.data.synth.anatomy import sample_anatomy
from medvlp.data.synth.findings import (
    CLASSES,
    PREVALENCE,
    labels_for,
    sample_acute,
    sample_chronic,
)
from medvlp.data.synth.render import finding_meta, render_study, sample_acquisition

# Smallest mean absolute change (gray levels) inside a finding's mask at 48 px: subtle classes
# (a rib fracture, mild scoliosis, mild edema's haze) change the image less than an effusion.
# A rib fracture is the subtlest (a rib is ~1.5 px thick at 48 px).
MIN_DIFF = {"Fracture": 1.5, "Scoliosis": 5.0, "Edema": 6.0, "Support Devices": 5.0}


def _study(i: int, seed: int = 0):
    rng = np.random.default_rng([seed, i])
    anat = sample_anatomy(rng)
    chronic = sample_chronic(rng, anat)
    acq = sample_acquisition(rng)
    return anat, acq, chronic + sample_acute(rng, anat, chronic)


def test_prevalences_within_documented_ranges() -> None:
    n = 2000
    counts = dict.fromkeys(CLASSES, 0)
    for i in range(n):
        rng = np.random.default_rng([1, i])
        anat = sample_anatomy(rng)
        chronic = sample_chronic(rng, anat)
        for c, v in labels_for(chronic + sample_acute(rng, anat, chronic)).items():
            counts[c] += v
    assert list(PREVALENCE) == CLASSES
    for c in CLASSES:
        lo, hi = PREVALENCE[c]
        assert lo <= counts[c] / n <= hi, (c, counts[c] / n, (lo, hi))
        assert counts[c] / n >= 0.045  # every class is common enough to learn


def test_every_labelled_finding_is_visible_inside_its_mask() -> None:
    seen = dict.fromkeys(CLASSES[1:], 0)
    for i in range(220):
        anat, acq, findings = _study(i)
        if not findings:
            continue
        full = render_study(anat, acq, findings, 48)
        assert set(full.masks) == {f.name for f in findings}  # absent classes have no mask
        assert len(full.instance_masks) == len(findings)
        for k, f in enumerate(findings):
            mask = full.instance_masks[k]
            assert (mask > 0.5).sum() >= 1, (i, f.name, f.severity)
            without = render_study(anat, acq, findings[:k] + findings[k + 1:], 48)
            diff = np.abs(full.image.astype(float) - without.image.astype(float))
            inside = diff[mask > 0.5].mean()
            assert inside > MIN_DIFF.get(f.name, 12.0), (i, f.name, f.severity, f.params.get("device"), inside)
            assert diff[mask <= 0.01].mean() < 0.5, (i, f.name)  # nothing changes away from it
            seen[f.name] += 1
    assert all(n >= 3 for n in seen.values()), seen


def test_chronic_findings_are_shared_and_acute_vary() -> None:
    for i in range(400):
        rng = np.random.default_rng([2, i])
        anat = sample_anatomy(rng)
        chronic = sample_chronic(rng, anat)
        if len(chronic) >= 2:
            break
    acute = [sample_acute(np.random.default_rng([2, i, t]), anat, chronic) for t in range(12)]
    assert len({tuple((f.name, f.side, f.severity) for f in a) for a in acute}) > 1
    chronic_names = {f.name for f in chronic}
    assert chronic_names <= {"Cardiomegaly", "Nodule", "Calcified Granuloma", "Scoliosis", "Support Devices"}
    for a in acute:  # acute findings never land in a cell a chronic finding occupies
        for f in a:
            for g in chronic:
                shared = f.cells() & g.cells()
                assert not shared or {f.name, g.name} == {"Pneumothorax", "Fracture"}


def test_ap_films_magnify_a_normal_heart_below_the_cardiomegaly_threshold() -> None:
    rng = np.random.default_rng(3)
    acqs = [sample_acquisition(rng) for _ in range(300)]
    ap = [a for a in acqs if a.view == "AP"]
    assert 20 <= len(ap) <= 80 and all(a.heart_scale == 1.0 and a.dome_lift == 0.0 for a in acqs if a.view == "PA")
    assert all(1.05 < a.heart_scale and 0.47 * a.heart_scale < 0.55 for a in ap)
    anat = sample_anatomy(np.random.default_rng(4))
    pa_acq = next(a for a in acqs if a.view == "PA")
    import dataclasses

    ap_acq = dataclasses.replace(pa_acq, view="AP", heart_scale=1.1, dome_lift=0.03, clavicle_lift=0.08)
    pa_img, ap_img = (render_study(anat, a, [], 64).image.astype(float) for a in (pa_acq, ap_acq))
    assert np.abs(pa_img - ap_img).mean() > 1.0


@pytest.mark.parametrize("device", ["ett", "cvc", "picc", "ng", "pacemaker", "icd", "sternotomy"])
def test_devices_render_and_are_described_in_meta(device: str) -> None:
    for i in range(3000):
        anat, acq, findings = _study(i, seed=5)
        hits = [k for k, f in enumerate(findings) if f.name == "Support Devices" and f.params["device"] == device]
        if hits:
            break
    else:
        pytest.fail(f"no {device} in 3000 studies")
    r = render_study(anat, acq, findings, 64)
    k = hits[0]
    meta = finding_meta(findings[k], r.instance_masks[k], acq, 64)
    assert meta["name"] == "Support Devices" and meta["device"] == device
    x0, y0, x1, y1 = meta["bbox"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    if device in ("ett", "cvc", "picc", "ng"):
        tx, ty = meta["tip"]
        assert x0 - 2 <= tx <= x1 + 2 and y0 - 2 <= ty <= y1 + 2  # the tip lies on the device
    import json

    json.dumps(meta)
