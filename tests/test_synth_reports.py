"""SynthCXR reports: contract with the labels, hedging, comparison, disjoint held-out wording."""
from __future__ import annotations

import re

import numpy as np
import pytest

from medvlp.data.synth.anatomy import sample_anatomy
from medvlp.data.synth.findings import CLASSES, Finding, sample_acute, sample_chronic
from medvlp.data.synth.phrasings import POOLS
from medvlp.data.synth.reports import (
    HEDGE_CUES,
    build_report,
    classes_named,
    is_subtle,
    polarity,
    report_contract,
    sentences,
    template_key,
)


def _subject_studies(i: int, n: int = 2) -> list[list[Finding]]:
    rng = np.random.default_rng([9, i])
    anat = sample_anatomy(rng)
    chronic = sample_chronic(rng, anat)
    return [chronic + sample_acute(np.random.default_rng([9, i, t]), anat, chronic) for t in range(n)]


@pytest.mark.parametrize("held_out", [False, True])
def test_reports_satisfy_the_contract(held_out: bool) -> None:
    covered: set[str] = set()
    for i in range(500):
        first, second = _subject_studies(i)
        for findings, prior in ((first, None), (second, first)):
            text, impression = build_report(findings, np.random.default_rng(i), prior=prior, held_out=held_out)
            assert report_contract(text, impression, findings) == [], (text, impression)
            covered |= {f.name for f in findings}
    assert covered == set(CLASSES[1:])


def test_contract_catches_contradictions() -> None:
    eff = Finding("Pleural Effusion", "right", "lower", "large")
    small = Finding("Pleural Effusion", "right", "lower", "small")
    nod = Finding("Nodule", "left", "upper", "small")
    ok = ("Large right pleural effusion.", "Right pleural effusion.")
    assert report_contract(*ok, [eff]) == []
    assert report_contract("No pleural effusion.", "Right pleural effusion.", [eff])  # negates a present class
    assert report_contract(*ok, [])  # affirms an absent class
    assert report_contract("Possible right pleural effusion.", "Right pleural effusion.", [eff])  # hedges a large one
    assert report_contract("Possible right pleural effusion.", "Right pleural effusion.", [small]) == []
    assert report_contract("The lungs are clear. Small left nodule.", "Left nodule.", [nod])  # clear lungs vs nodule
    assert report_contract("Heart size is normal.", "Normal chest radiograph.", [nod])  # nodule never mentioned
    assert polarity("Pneumothorax cannot be excluded.") == "hedged"
    assert polarity("Pleural effusion is not seen.") == "negated" and polarity("Negative for edema.") == "negated"
    assert classes_named("Small calcified granuloma in the right upper zone.") == {"Calcified Granuloma"}


def test_hedging_only_for_subtle_present_findings() -> None:
    hedged = subtle = 0
    for i in range(400):
        findings = _subject_studies(i, 1)[0]
        text, _ = build_report(findings, np.random.default_rng(i))
        for s in sentences(text):
            if polarity(s) == "hedged":
                named = classes_named(s)
                assert named and all(any(f.name == c and is_subtle(f) for f in findings) for c in named), s
                hedged += 1
        subtle += sum(is_subtle(f) for f in findings)
    assert 0.1 * subtle < hedged < 0.5 * subtle, (hedged, subtle)


def test_comparison_with_the_prior_study() -> None:
    eff_small = Finding("Pleural Effusion", "left", "lower", "small")
    eff_large = Finding("Pleural Effusion", "left", "lower", "large")
    ptx = Finding("Pneumothorax", "right", "apical", "moderate", {"collapse": 0.3})
    cmp_words = {"same": ("unchanged", "stable"), "up": ("increase",), "new": ("new",)}
    found = dict.fromkeys(cmp_words, False)
    resolved = False
    for k in range(60):
        rng = np.random.default_rng(k)
        text = build_report([eff_large, ptx], rng, prior=[eff_small])[0].lower()
        found["up"] |= any(w in text for w in cmp_words["up"])
        found["new"] |= any(w in text for w in cmp_words["new"])
        text = build_report([eff_large], rng, prior=[eff_large, ptx])[0].lower()
        found["same"] |= any(w in text for w in cmp_words["same"])
        resolved |= "no residual right pneumothorax" in text or "no right pneumothorax, previously seen" in text
        assert report_contract(text, "Left pleural effusion.", [eff_large]) == []
    assert all(found.values()) and resolved, found
    plain = " ".join(build_report([eff_large], np.random.default_rng(k))[0] for k in range(30)).lower()
    assert "prior" not in plain and "unchanged" not in plain  # no comparison without a prior


_VARIABLE = re.compile(r"\b(right|left|bilateral|upper|mid|middle|lower|small|large|mild|mildly|moderate|moderately|"
                       r"severe|marked|markedly|focal|patchy|extensive|dense|\d+(\.\d+)?|\d+(st|nd|rd|th)|svc|"
                       r"cavoatrial junction|right atrium|stomach|distal esophagus|internal jugular|subclavian|"
                       r"basilic|dextroconvex|levoconvex|s-shaped)\b")


def _normalise(sentence: str) -> str:
    return re.sub(r"\s+", " ", _VARIABLE.sub("#", sentence.lower())).strip()


def test_held_out_pool_is_disjoint_from_the_training_pool() -> None:
    def flat(pool: dict) -> set[str]:
        out: set[str] = set()
        for value in pool.values():
            if isinstance(value, dict):
                out |= flat(value)
            else:
                out |= set(value)
        return out

    assert not flat(POOLS["train"]) & flat(POOLS["heldout"])  # no template in common
    seen = {False: set(), True: set()}
    for i in range(400):
        first, second = _subject_studies(i)
        for held in (False, True):
            for findings, prior in ((first, None), (second, first)):
                text, impression = build_report(findings, np.random.default_rng(i), prior=prior, held_out=held)
                seen[held] |= {_normalise(s) for s in sentences(text) + sentences(impression)}
    assert len(seen[False]) > 150 and len(seen[True]) > 150
    assert not seen[False] & seen[True], sorted(seen[False] & seen[True])[:10]


@pytest.mark.parametrize("pool", ["train", "heldout"])
def test_every_class_has_many_phrasings(pool: str) -> None:
    templates = POOLS[pool]
    for c in CLASSES[1:]:
        groups = [v for k, v in templates.items() if k.split("/")[0] == c]
        n = sum(len(g.get(s, ())) for g in groups for s in ("pos", "impr", "hedge", "himpr")) + len(templates["neg"][c])
        assert n >= 6, (pool, c, n)
    hedges = [t for k, g in templates.items() if isinstance(g, dict) and k != "neg" for t in g.get("hedge", ())]
    assert all(any(cue in t.lower() for cue in HEDGE_CUES) for t in hedges)


def test_template_keys_exist_for_every_sampled_finding() -> None:
    for i in range(300):
        for f in _subject_studies(i, 1)[0]:
            for pool in POOLS.values():
                assert template_key(f) in pool, template_key(f)
