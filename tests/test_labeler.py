"""Report labeler: hand-written sentences with known answers (no IU text)."""
from __future__ import annotations

import time

import pytest

from medvlp.data.labeler import ReportLabeler
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN


@pytest.fixture(scope="module")
def labeler():
    return ReportLabeler()


@pytest.mark.parametrize("text, cls, code", [
    ("No pneumothorax.", "Pneumothorax", NEGATIVE),
    ("There is a small right pleural effusion.", "Pleural Effusion", POSITIVE),
    ("The lungs are free of consolidation.", "Consolidation", NEGATIVE),
    ("Negative for pneumothorax.", "Pneumothorax", NEGATIVE),
    ("No evidence of focal airspace disease, pleural effusion, or pneumothorax.", "Pneumothorax", NEGATIVE),
    ("Pneumothorax is not seen.", "Pneumothorax", NEGATIVE),
    ("The right pleural effusion has resolved.", "Pleural Effusion", NEGATIVE),
    ("Pleural effusions are absent.", "Pleural Effusion", NEGATIVE),
    ("The heart is not enlarged.", "Cardiomegaly", NEGATIVE),
    ("Heart size is normal.", "Cardiomegaly", NEGATIVE),
    ("The heart is mildly enlarged.", "Cardiomegaly", POSITIVE),
    ("Possible left lower lobe atelectasis.", "Atelectasis", UNCERTAIN),
    ("Pneumonia cannot be excluded.", "Consolidation", UNCERTAIN),
    ("Findings suggestive of pulmonary edema.", "Edema", UNCERTAIN),
    ("Atelectasis versus consolidation at the left base.", "Consolidation", UNCERTAIN),
    ("No focal opacity to suggest pneumonia.", "Consolidation", NEGATIVE),
    ("No effusion, but there is a right upper lobe consolidation.", "Consolidation", POSITIVE),
    ("No effusion, but there is a right upper lobe consolidation.", "Pleural Effusion", NEGATIVE),
    ("No pneumothorax; small bilateral effusions.", "Pleural Effusion", POSITIVE),
    ("Multiple calcified granulomas.", "Calcified Granuloma", POSITIVE),
    ("Bibasilar atelectases.", "Atelectasis", POSITIVE),
    ("Small bilateral pneumothoraces.", "Pneumothorax", POSITIVE),
    ("Stable airspace opacities in the right lower lobe.", "Consolidation", POSITIVE),
    ("Mild dextroscoliosis of the thoracic spine.", "Scoliosis", POSITIVE),
    ("Median sternotomy wires are intact.", "Support Devices", POSITIVE),
    ("Healed left rib fractures.", "Fracture", POSITIVE),
    ("Large pericardial effusion.", "Pleural Effusion", MISSING),
    ("A 6 mm nodule in the right upper lobe.", "Nodule", POSITIVE),
    ("A 6 mm nodule in the right upper lobe.", "Calcified Granuloma", MISSING),
    ("Heart size and pulmonary XXXX are within normal limits. No XXXX of pleural effusion.",
     "Pleural Effusion", NEGATIVE),
])
def test_sentence_labels(labeler, text, cls, code):
    assert labeler.label(text)[cls] == code


def test_priority_positive_over_uncertain_over_negative(labeler):
    assert labeler.label("No effusion on the left. Small right effusion.")["Pleural Effusion"] == POSITIVE
    assert labeler.label("No effusion on the left. Possible right effusion.")["Pleural Effusion"] == UNCERTAIN


def test_no_finding_rules(labeler):
    normal = labeler.label("Heart size is normal. No pneumothorax or pleural effusion. Lungs are clear.")
    assert normal["No Finding"] == POSITIVE
    assert labeler.label("Mild cardiomegaly.")["No Finding"] == NEGATIVE
    assert labeler.label("Possible small effusion.")["No Finding"] == NEGATIVE  # uncertain blocks it
    assert labeler.label("Normal chest.")["No Finding"] == POSITIVE


@pytest.mark.parametrize("text", ["", "   ", None, "XXXX XXXX."])
def test_empty_text_is_all_missing(labeler, text):
    assert set(labeler.label(text).values()) == {MISSING}


def test_mentions_offsets_and_status(labeler):
    text = "Stable cardiomegaly. No pneumothorax."
    mentions = labeler.mentions(text)
    assert [(m.cls, text[m.start:m.end], m.status) for m in mentions] == [
        ("Cardiomegaly", "cardiomegaly", POSITIVE), ("Pneumothorax", "pneumothorax", NEGATIVE)]
    assert mentions[1].sentence == "No pneumothorax."


def test_label_many_and_speed(labeler):
    texts = [("Heart is mildly enlarged. Small bilateral effusions. No pneumothorax. Possible left basilar "
             "atelectasis versus infiltrate. Median sternotomy wires.")] * 500
    t0 = time.perf_counter()
    out = labeler.label_many(texts)
    rate = len(texts) / (time.perf_counter() - t0)
    assert len(out) == 500 and out[0] == out[-1]
    assert out[0]["Support Devices"] == POSITIVE and out[0]["Atelectasis"] == UNCERTAIN
    assert rate > 1000, f"{rate:.0f} reports/s"


def test_custom_knowledge_base(tmp_path):
    from medvlp.data.knowledge import load_knowledge

    path = tmp_path / "kb.yaml"
    path.write_text("classes:\n  - {name: Widget, synonyms: [widget, gizmo], definition: d, location: l, appearance: a}\n")
    lab = ReportLabeler(load_knowledge(path))
    assert lab.label("Two gizmos are seen.") == {"Widget": POSITIVE}
    assert lab.label("No widget.") == {"Widget": NEGATIVE}
