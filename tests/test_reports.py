"""medvlp.data.reports: sections, placeholder cleanup and labels on hand-written reports and real IU ones."""
from __future__ import annotations

from collections import Counter

import pytest

from medvlp.data import iu, reports
from medvlp.data.labeler import ReportLabeler
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN
from medvlp.errors import DataError

# Hand-written in the MIMIC-CXR layout (banner, indented headers, blank lines, "___" and
# MIMIC-III "[**...**]" placeholders, a lower-case header, a colon inside a sentence).
MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough, evaluate for pneumonia.
 Dr. [**Last Name (NamePattern1) 123**] [**First Name 4**] requested.

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 There is a small right pleural effusion.  No pneumothorax.
 The heart size is normal. Note the time: see below.

 Impression:

 Small right pleural effusion.
 Findings were communicated to Dr. ___ ___ at 10:15 on ___.
 ADDENDUM: left PICC tip in the SVC.
"""

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR77"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">XXXX, XXXX.</AbstractText>
<AbstractText Label="INDICATION">XXXX-year-old male, chest pain.</AbstractText>
<AbstractText Label="FINDINGS">The heart is mildly enlarged. There are no XXXX of a pleural
    effusion.</AbstractText>
<AbstractText Label="IMPRESSION">Mild cardiomegaly.</AbstractText>
</Abstract></Article></MedlineCitation><MeSH><major>Cardiomegaly/mild</major></MeSH></eCitation>"""


def test_mimic_sections_in_order_with_multiline_bodies():
    s = reports.extract_sections(MIMIC)
    assert list(s) == ["examination", "indication", "technique", "comparison", "findings", "impression",
                       "addendum"]
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["indication"] == "___ year old woman with cough, evaluate for pneumonia. Dr. ___ requested."
    assert s["findings"] == ("There is a small right pleural effusion. No pneumothorax. "
                             "The heart size is normal. Note the time: see below.")
    assert s["impression"] == "Small right pleural effusion. Findings were communicated to Dr. ___ at 10:15 on ___."
    assert s["addendum"] == "left PICC tip in the SVC."
    assert s["comparison"] == "___"
    raw = reports.extract_sections(MIMIC, clean=False)
    assert raw["findings"].startswith("There is a small") and "\n" in raw["findings"]


def test_aliases_repeats_and_preamble():
    text = "Chest radiograph.\nClinical History: fever\nFINDINGS: Lungs clear.\nIMPRESSIONS: Normal.\nfindings: No effusion."
    s = reports.extract_sections(text)
    assert s == {"preamble": "Chest radiograph.", "history": "fever",
                 "findings": "Lungs clear. No effusion.", "impression": "Normal."}
    assert reports.extract_sections("No acute cardiopulmonary process.") == {
        "preamble": "No acute cardiopulmonary process."}
    assert reports.extract_sections("") == {} and reports.extract_sections(None) == {}


def test_clean_text_placeholders_and_whitespace():
    assert reports.clean_text("Dr. [**Last Name**] [**First Name 4**] was paged at ___ ,  ___.") == \
        "Dr. ___ was paged at ___."
    assert reports.clean_text("There are no XXXX of a pleural\n  effusion .") == "There are no ___ of a pleural effusion."
    assert reports.clean_text("XXXX XXXX, stable. [**Hospital1 18**] XXXX") == "___, stable. ___"
    assert reports.clean_text("XXXXyo male") == "___yo male"  # placeholders glued to words occur in IU
    assert reports.clean_text("Seen by Dr. ___ today.", replacement="") == "Seen by Dr. today."
    assert reports.clean_text("A boxxxxed text with _ and x_y") == "A boxxxxed text with _ and x_y"


def test_label_report_uses_findings_and_impression_only():
    labels = reports.label_report(MIMIC)
    assert labels["Pleural Effusion"] == POSITIVE and labels["Pneumothorax"] == NEGATIVE
    assert labels["Cardiomegaly"] == NEGATIVE and labels["No Finding"] == NEGATIVE
    # the indication asks about pneumonia and effusion; the answer is "no acute process"
    text = "INDICATION: evaluate for pleural effusion or edema.\nFINDINGS: No acute cardiopulmonary process."
    labels = reports.label_report(text)
    assert labels["Pleural Effusion"] == MISSING and labels["Edema"] == MISSING
    assert labels["No Finding"] == POSITIVE
    # no findings/impression header: the remaining free text is labelled
    assert reports.label_report("Possible small left pleural effusion.")["Pleural Effusion"] == UNCERTAIN
    assert reports.label_report({"findings": "Moderate cardiomegaly."})["Cardiomegaly"] == POSITIVE


def test_empty_reports_are_counted_or_raise():
    counts = Counter()
    for empty in ("", None, "FINDINGS: ___\nIMPRESSION: XXXX XXXX.", "INDICATION: chest pain.\nFINDINGS:\n"):
        assert reports.label_report(empty, counts=counts) is None
    assert counts["empty_report"] == 4
    with pytest.raises(DataError, match=r"s12345\.txt: empty report"):
        reports.label_report("IMPRESSION: [**Name**]", strict=True, where="s12345.txt")


def test_iu_xml_sections_and_labels():
    s = reports.iu_sections(IU_XML)
    assert s == {"indication": "___-year-old male, chest pain.", "comparison": "___.",
                 "findings": "The heart is mildly enlarged. There are no ___ of a pleural effusion.",
                 "impression": "Mild cardiomegaly."}
    rep = iu.parse_report_xml(IU_XML.encode())
    assert reports.iu_sections(rep) == s
    labels = reports.label_report(rep)
    assert labels["Cardiomegaly"] == POSITIVE and labels["Pleural Effusion"] == NEGATIVE
    assert labels == ReportLabeler().label(iu.clean_placeholders(rep.text()))


def test_real_iu_reports(iu_wheel):
    rs = iu.load_iu_reports(iu_wheel)
    empty = [r for r in rs if not reports.report_text(reports.iu_sections(r, replacement=""))]
    assert len(empty) == sum(not r.findings.strip() and not r.impression.strip() for r in rs) > 0
    counts = Counter()
    assert all(reports.label_report(r, counts=counts) is None for r in empty)
    assert counts["empty_report"] == len(empty)
    assert not any("XXXX" in v for r in rs[:500] for v in reports.iu_sections(r).values())
    # coded MeSH tags as reference: effusion reports found, normal reports labelled No Finding
    eff = [r for r in rs if "pleural effusion" in {h.lower() for h in r.headings}]
    found = [reports.label_report(r)["Pleural Effusion"] in (POSITIVE, UNCERTAIN) for r in eff]
    assert len(eff) > 100 and sum(found) / len(found) > 0.9
    normal = [lab for r in [r for r in rs if r.headings == ["normal"]][:300] if (lab := reports.label_report(r))]
    assert len(normal) > 250 and sum(lab["No Finding"] == POSITIVE for lab in normal) / len(normal) > 0.9
