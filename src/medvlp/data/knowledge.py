"""Knowledge base of the finding classes: synonyms, definitions, location, appearance.

One YAML file describes each class (``src/medvlp/data/resources/knowledge.yaml`` by
default; users can point :func:`load_knowledge` at their own). The report labeler
(:mod:`medvlp.data.labeler`) reads the synonyms; knowledge-guided methods (MLIP, UMCL)
read the definitions. The file is validated strictly so a typo surfaces as a
:class:`~medvlp.errors.ConfigError` naming the entry, the field and the fix, rather than
as a class the labeler silently never finds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medvlp.errors import ConfigError

REQUIRED_FIELDS = ("name", "synonyms", "definition", "location", "appearance")
OPTIONAL_FIELDS = ("negative_phrases", "exclusions", "cui", "cui_source")
PHRASE_FIELDS = ("synonyms", "negative_phrases", "exclusions")


@dataclass
class KnowledgeEntry:
    """What the knowledge base knows about one class."""

    name: str
    synonyms: list[str]
    definition: str
    location: str
    appearance: str
    negative_phrases: list[str] = field(default_factory=list)
    exclusions: list[str] = field(default_factory=list)
    cui: str = ""
    cui_source: str = ""


@dataclass
class KnowledgeBase:
    """All entries, in file order (which is the class order)."""

    entries: dict[str, KnowledgeEntry]
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return list(self.entries)

    def synonyms(self, name: str) -> list[str]:
        return list(self._entry(name).synonyms)

    def definition(self, name: str) -> str:
        return self._entry(name).definition

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "classes": [asdict(e) for e in self.entries.values()]}

    def _entry(self, name: str) -> KnowledgeEntry:
        if name not in self.entries:
            raise ConfigError(
                f"class {name!r} is not in the knowledge base {self.source or '(in memory)'}; "
                f"known classes: {', '.join(self.entries)}. Add an entry for it or fix the name."
            )
        return self.entries[name]


def default_knowledge_path() -> Path:
    return Path(str(resources.files("medvlp.data") / "resources" / "knowledge.yaml"))


def load_knowledge(path: str | Path | None = None) -> KnowledgeBase:
    """Read and validate a knowledge-base YAML (default: the file shipped with medvlp)."""
    path = Path(path) if path is not None else default_knowledge_path()
    if not path.is_file():
        raise ConfigError(f"knowledge base {path} does not exist; pass the path of a YAML file "
                          "laid out like medvlp/data/resources/knowledge.yaml, or None for the default.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"knowledge base {path} is not valid YAML: {exc}") from exc
    return knowledge_from_dict(raw, source=str(path))


def knowledge_from_dict(raw: Any, source: str = "(in memory)") -> KnowledgeBase:
    """Validate a parsed knowledge base (``{"classes": [entry, ...]}``) and build it."""
    if not isinstance(raw, dict) or not isinstance(raw.get("classes"), list):
        raise ConfigError(f"knowledge base {source}: expected a mapping with a 'classes' list of "
                          "entries (see medvlp/data/resources/knowledge.yaml).")
    entries: dict[str, KnowledgeEntry] = {}
    for i, item in enumerate(raw["classes"]):
        entry = _validate_entry(item, i, source)
        if entry.name in entries:
            raise ConfigError(f"knowledge base {source}: class {entry.name!r} appears twice "
                              f"(entry #{i}); merge the two entries into one.")
        entries[entry.name] = entry
    if not entries:
        raise ConfigError(f"knowledge base {source}: 'classes' is empty; add at least one entry.")
    return KnowledgeBase(entries=entries, source=source)


def _validate_entry(item: Any, index: int, source: str) -> KnowledgeEntry:
    where = f"knowledge base {source}, entry #{index}"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with fields {', '.join(REQUIRED_FIELDS)}.")
    if isinstance(item.get("name"), str):
        where = f"knowledge base {source}, class {item['name']!r}"
    unknown = sorted(set(item) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed fields are "
                          f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)} (check the spelling).")
    for key in REQUIRED_FIELDS:
        if key not in item or item[key] in (None, "", []):
            hint = "give at least one lower-case phrase" if key == "synonyms" else "fill it in"
            raise ConfigError(f"{where}: field {key!r} is missing or empty; {hint}.")
    for key in ("name", "definition", "location", "appearance", "cui", "cui_source"):
        if key in item and item[key] is not None and not isinstance(item[key], str):
            raise ConfigError(f"{where}: field {key!r} must be a string, got {type(item[key]).__name__}.")
    phrases = {}
    for key in PHRASE_FIELDS:
        value = item.get(key) or []
        if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
            raise ConfigError(f"{where}: field {key!r} must be a list of non-empty phrases.")
        bad = [p for p in value if p != p.lower()]
        if bad:
            raise ConfigError(f"{where}: field {key!r} has phrases that are not lower-case: {bad}; "
                              "write them in lower case (matching ignores case anyway).")
        phrases[key] = [" ".join(p.split()) for p in value]
    cui, cui_source = (item.get("cui") or "").strip(), (item.get("cui_source") or "").strip()
    if cui and not cui_source:
        raise ConfigError(f"{where}: field 'cui' is set ({cui}) without 'cui_source'; say where the "
                          "CUI was looked up (e.g. the UMLS Metathesaurus release) or leave 'cui' blank.")
    return KnowledgeEntry(
        name=item["name"], synonyms=phrases["synonyms"], definition=item["definition"].strip(),
        location=item["location"].strip(), appearance=item["appearance"].strip(),
        negative_phrases=phrases["negative_phrases"], exclusions=phrases["exclusions"],
        cui=cui, cui_source=cui_source,
    )
