"""Knowledge base: the shipped file loads; malformed files fail with a message naming the fix."""
from __future__ import annotations

import pytest
import yaml

from medvlp.data.knowledge import knowledge_from_dict, load_knowledge
from medvlp.errors import ConfigError

CLASSES = ["No Finding", "Cardiomegaly", "Pleural Effusion", "Consolidation", "Atelectasis", "Edema", "Nodule",
           "Calcified Granuloma", "Pneumothorax", "Scoliosis", "Support Devices", "Fracture"]


def _entry(**over):
    base = {"name": "Widget", "synonyms": ["widget"], "definition": "d", "location": "l", "appearance": "a"}
    base.update(over)
    return base


def test_shipped_knowledge_base():
    kb = load_knowledge()
    assert kb.classes == CLASSES
    assert "pleural effusion" in kb.synonyms("Pleural Effusion")
    assert kb.definition("Pneumothorax").lower().startswith("air in the pleural space")
    for name in CLASSES:
        entry = kb.entries[name]
        assert entry.synonyms and entry.location and entry.appearance
        assert not entry.cui or entry.cui_source  # no CUI without its source
    roundtrip = knowledge_from_dict(kb.to_dict())
    assert roundtrip.entries == kb.entries


def test_user_file(tmp_path):
    path = tmp_path / "kb.yaml"
    path.write_text(yaml.safe_dump({"classes": [_entry()]}))
    kb = load_knowledge(path)
    assert kb.classes == ["Widget"] and kb.synonyms("Widget") == ["widget"]
    with pytest.raises(ConfigError, match="'Gadget' is not in the knowledge base"):
        kb.definition("Gadget")


@pytest.mark.parametrize("entries, pattern", [
    ([_entry(colour="red")], r"class 'Widget'.*unknown field\(s\) colour"),
    ([{k: v for k, v in _entry().items() if k != "definition"}], r"class 'Widget'.*'definition' is missing"),
    ([_entry(synonyms=[])], r"class 'Widget'.*'synonyms' is missing or empty; give at least one"),
    ([_entry(), _entry()], r"'Widget' appears twice.*merge"),
    ([_entry(synonyms=["Widget"])], r"not lower-case"),
    ([_entry(cui="C0000000")], r"without 'cui_source'"),
    ([_entry(exclusions="widget")], r"'exclusions' must be a list"),
    ([], r"'classes' is empty"),
])
def test_validation_errors(entries, pattern):
    with pytest.raises(ConfigError, match=pattern):
        knowledge_from_dict({"classes": entries}, source="kb.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_knowledge(tmp_path / "nope.yaml")
