"""Radiology report text: section extraction, de-identification cleanup and labels.

* :func:`extract_sections` splits a MIMIC-CXR style free-text report at its headers
  ("FINDINGS:", "IMPRESSION:", "INDICATION:", ...). A header is a line that starts (after
  indentation) with a name and a colon; names from :data:`SECTION_ALIASES` match in any case
  ("Findings:"), other names only when written in capitals ("NOTE:" -> ``note``). Bodies run
  to the next header, over several lines. Text before the first header is ``preamble``
  (MIMIC's "FINAL REPORT" banner is dropped). Repeated sections are joined with a space.
* :func:`iu_sections` gives the same dict for an IU X-ray report, reusing
  :func:`medvlp.data.iu.parse_report_xml` for the XML ``AbstractText Label=...`` elements.
* :func:`clean_text` replaces every de-identification placeholder -- MIMIC-CXR's ``___``,
  MIMIC-III's ``[**...**]`` and IU's ``XXXX`` -- by one token (:data:`DEID_TOKEN`, ``"___"``,
  so MIMIC-CXR text is unchanged; a run of placeholders becomes a single token) and
  normalises whitespace to single spaces with no space before punctuation.
* :func:`label_report` labels the findings and impression with the project's
  :class:`~medvlp.data.labeler.ReportLabeler`. The indication, history, comparison and
  technique sections are never labelled: they state the clinical question ("evaluate for
  pneumonia"), not the answer. A report with none of the two falls back to the remaining text.

Empty reports: a report with no letters or digits in the labelled text (after removing
placeholders) is a bad sample. :func:`label_report` returns None and adds one to
``counts["empty_report"]`` (skip and count), or raises :class:`DataError` naming ``where``
when ``strict=True``.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache

from medvlp.data import iu
from medvlp.data.labeler import ReportLabeler
from medvlp.errors import DataError

DEID_TOKEN = "___"
LABEL_SECTIONS = ("findings", "impression")
CONTEXT_SECTIONS = ("indication", "history", "comparison", "technique", "examination", "wet_read",
                    "notification", "recommendation")
SECTION_ALIASES = {
    "findings": ("FINDINGS", "FINDING", "FINDINGS AND IMPRESSION"),
    "impression": ("IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "OPINION"),
    "indication": ("INDICATION", "INDICATIONS", "CLINICAL INDICATION", "REASON FOR EXAM",
                   "REASON FOR EXAMINATION", "REASON FOR STUDY", "CLINICAL INFORMATION"),
    "history": ("HISTORY", "CLINICAL HISTORY", "MEDICAL HISTORY"),
    "comparison": ("COMPARISON", "COMPARISONS", "PRIOR STUDIES", "PRIOR STUDY"),
    "technique": ("TECHNIQUE", "PROCEDURE"),
    "examination": ("EXAMINATION", "EXAM", "STUDY", "TYPE OF EXAMINATION"),
    "wet_read": ("WET READ",),
    "notification": ("NOTIFICATION", "NOTIFICATIONS"),
    "recommendation": ("RECOMMENDATION", "RECOMMENDATIONS", "FOLLOW UP", "FOLLOW-UP"),
}
_ALIAS = {name: key for key, names in SECTION_ALIASES.items() for name in names}
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z &/()-]{0,40}?)[ \t]*:", re.MULTILINE)
_BANNER = re.compile(r"^\s*FINAL REPORT\s*$", re.MULTILINE | re.IGNORECASE)
# MIMIC-CXR "___" (two or more underscores) and MIMIC-III "[** ... **]" spans, with any runs of
# them separated only by spaces or commas merged into one.
_MIMIC_ONE = r"(?:_{2,}|\[\*\*[^\n]*?\*\*\])"
_GLUED_X = re.compile(r"X{4,}")  # upper case only: lower-case "xxxx" may be ordinary text
_MIMIC_RUN = re.compile(_MIMIC_ONE + r"(?:[ \t,]+" + _MIMIC_ONE + r")*")


def clean_text(text: str | None, replacement: str = DEID_TOKEN) -> str:
    """Placeholders -> ``replacement`` (one per run), whitespace -> single spaces, one line.

    "Dr. [**Last Name**] [**First Name**] was paged at ___." -> "Dr. ___ was paged at ___.";
    "There are no XXXX of effusion." -> "There are no ___ of effusion."; with
    ``replacement=""`` the placeholders are removed instead.
    """
    if not text:
        return ""
    out = _MIMIC_RUN.sub(replacement, text)
    # IU's "XXXX" runs, by the IU reader's own rule (it also drops the space before punctuation)
    out = iu.clean_placeholders(out, replacement)
    out = _GLUED_X.sub(replacement, out)  # "XXXX" glued to a word ("XXXXyo"), which IU also has
    if replacement:  # two different placeholder styles side by side are still one span
        token = re.escape(replacement)
        out = re.sub(rf"{token}(?:[ ,]+{token})+", replacement, out)
    return out


def _header_key(name: str) -> str | None:
    norm = " ".join(name.split()).upper()
    if norm in _ALIAS:
        return _ALIAS[norm]
    if name.isupper():  # an unknown capitalised header ("NOTE:") is a section of its own
        return re.sub(r"[^a-z0-9]+", "_", norm.lower()).strip("_") or None
    return None


def extract_sections(text: str | None, *, clean: bool = True, replacement: str = DEID_TOKEN) -> dict[str, str]:
    """Section name -> body for a free-text (MIMIC-CXR style) report, in order of appearance.

    Keys are canonical (:data:`SECTION_ALIASES`: "Impressions:" -> ``impression``) or the
    lower-cased capitalised header; empty bodies are left out. ``clean``: pass each body
    through :func:`clean_text` (otherwise bodies keep their own line breaks, trimmed).
    """
    if not text:
        return {}
    text = _BANNER.sub("", text)
    heads = [(m, key) for m in _HEADER.finditer(text) if (key := _header_key(m.group(1)))]
    parts = [("preamble", text[: heads[0][0].start()] if heads else text)]
    for i, (m, key) in enumerate(heads):
        end = heads[i + 1][0].start() if i + 1 < len(heads) else len(text)
        parts.append((key, text[m.end(): end]))
    sections: dict[str, str] = {}
    for key, body in parts:
        body = clean_text(body, replacement) if clean else body.strip()
        if body:
            sections[key] = f"{sections[key]} {body}" if key in sections else body
    return sections


def iu_sections(report: iu.IUReport | bytes | str, *, clean: bool = True,
                replacement: str = DEID_TOKEN) -> dict[str, str]:
    """The non-empty sections of an IU X-ray report (an :class:`iu.IUReport` or its XML)."""
    if not isinstance(report, iu.IUReport):
        report = iu.parse_report_xml(report.encode() if isinstance(report, str) else report)
    order = ("indication", "comparison", "findings", "impression")
    bodies = ((k, getattr(report, k)) for k in order)
    return {k: (clean_text(v, replacement) if clean else v.strip()) for k, v in bodies if v and v.strip()}


def report_text(sections: Mapping[str, str]) -> str:
    """The labeller's input: findings then impression; without both, the non-context sections."""
    keys = [k for k in LABEL_SECTIONS if sections.get(k)]
    if not keys:
        keys = [k for k in sections if k not in CONTEXT_SECTIONS]
    return " ".join(sections[k] for k in keys if sections.get(k))


@lru_cache(maxsize=1)
def _default_labeler() -> ReportLabeler:
    return ReportLabeler()  # compiling the phrase regex takes a moment: build it once


def label_report(report: str | Mapping[str, str] | iu.IUReport | None, *, labeler: ReportLabeler | None = None,
                 counts: Counter | None = None, strict: bool = False,
                 where: str = "report") -> dict[str, int] | None:
    """Class -> POSITIVE / NEGATIVE / UNCERTAIN / MISSING for one report, or None if empty.

    ``report``: free text (sections are extracted), a sections dict, or an IU report.
    Empty (see the module docstring): ``counts["empty_report"] += 1`` and None, or
    :class:`DataError` naming ``where`` when ``strict``.
    """
    if isinstance(report, iu.IUReport):
        sections = iu_sections(report, replacement="")
    elif isinstance(report, Mapping):
        sections = {k: clean_text(v, "") for k, v in report.items()}
    else:
        sections = extract_sections(report, replacement="")
    text = report_text(sections)
    if not re.search(r"[A-Za-z0-9]", text):
        if strict:
            raise DataError(f"{where}: empty report (no findings, impression or other text once "
                            "de-identification placeholders are removed). Fix the report file, or "
                            "drop the sample; in preparation such samples are skipped and counted.")
        if counts is not None:
            counts["empty_report"] += 1
        return None
    return (labeler or _default_labeler()).label(text)
