"""Rule-based report labeler (CheXpert / NegBio-like) for the knowledge-base classes.

Pipeline per report:

1. **Sentences**: split at ``.``/``?``/``!`` followed by a space or the end, and at line breaks.
   De-identification placeholders ("XXXX") are blanked with spaces, keeping offsets.
2. **Mentions**: every synonym of every class (from :mod:`medvlp.data.knowledge`), on word
   boundaries, with plural forms of its last word; ``*`` in a phrase is a gap of up to three
   words. One compiled alternation finds them, longest phrase first, so "calcified nodule"
   (Calcified Granuloma) wins over "nodule" (Nodule). ``exclusions`` (e.g. "pericardial
   effusion") are matched too and swallow the span; ``negative_phrases`` ("heart size is
   normal") are NEGATIVE mentions outright.
3. **Clauses**: a sentence is cut into clauses at "but", "however", "although", "though",
   "except", "other than", "aside from", "apart from", "whereas", "while", "which", "there is",
   "there are", ";" and ":".
   Negation and uncertainty never cross a clause boundary.
4. **Status of a mention**: the cues of its clause (pre-negation "no", "without", "negative
   for", "free of", "no evidence of", "clear of", "resolution of", "removal of", ...;
   post-negation "is not seen", "has resolved", "are absent", "has been removed", ...;
   uncertainty "may", "possible", "questionable", "cannot be excluded", "suggestive of",
   "likely", "versus", "borderline", ...) act on mentions after them (pre cues, up to 15 words
   away) or before them (post cues, up to 6 words away); a cue inside the mention's own span
   ("heart is not enlarged") applies too. The nearest cue decides; no cue means POSITIVE.
   Phrases such as "cannot be excluded" are matched as uncertainty before "not" can be read as
   a negation; a hedge such as "to suggest" preceded by a negation in its clause ("no opacity to
   suggest pneumonia") negates.
5. **Per class**: POSITIVE > UNCERTAIN > NEGATIVE across mentions; a class never mentioned is
   MISSING. "No Finding" is POSITIVE when the text is not empty and no other class is POSITIVE
   or UNCERTAIN, else NEGATIVE. Empty text gives MISSING for every class.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from medvlp.data.knowledge import KnowledgeBase, load_knowledge
from medvlp.data.sample import MISSING, NEGATIVE, POSITIVE, UNCERTAIN

NO_FINDING = "No Finding"

PRE_NEGATION = [
    "no", "not", "without", "negative for", "free of", "clear of", "no evidence of", "no signs of",
    "no sign of", "no definite", "no suspicious", "no focal", "absence of", "absent", "resolved",
    "resolution of", "interval resolution of", "clearing of", "removal of", "interval removal of", "rather than",
    "no longer", "never", "nor", "ruled out", "negative",
]
POST_NEGATION = [
    "is not seen", "are not seen", "not seen", "not identified", "not visualized", "not appreciated",
    "not evident", "not present", "not demonstrated", "not detected", "is absent", "are absent",
    "absent", "has resolved", "have resolved", "resolved", "has cleared", "have cleared", "cleared",
    "has been removed", "have been removed", "removed", "no longer seen", "no longer visualized",
    "no longer present", "is unlikely", "are unlikely", "unlikely", "ruled out",
    "within normal limits", "within limits of normal", "within the limits of normal",
]
UNCERTAINTY = [
    "may", "might", "could", "possible", "possibly", "probable", "probably", "questionable",
    "question of", "questioned", "suspicious for", "suspicion of", "suspected", "suspect",
    "concern for", "concerning for", "suggestive of", "suggesting", "suggests", "suggest",
    "likely", "versus", "vs", "borderline", "equivocal", "indeterminate", "consider",
    "considered", "differential", "differential diagnosis", "presumably", "presumed",
    "cannot be excluded", "can not be excluded", "cannot exclude", "can not exclude",
    "can't exclude", "cannot be ruled out", "cannot rule out", "not excluded",
    "not be excluded", "not ruled out", "not entirely excluded", "difficult to exclude",
    "not be ruled out", "underlying", "in the appropriate clinical setting",
    "could represent", "may represent", "possibility of", "may be due to", "atypical",
]
# Uncertainty cues that read forward and backward ("effusion is possible", "possible effusion").
POST_UNCERTAINTY = [
    "cannot be excluded", "can not be excluded", "not excluded", "not be excluded", "not ruled out",
    "cannot be ruled out", "not entirely excluded", "is possible", "are possible", "possible",
    "is questioned", "questioned", "suspected", "is likely", "likely", "is suspected", "not be ruled out",
]
# Hedges that a negation earlier in the clause turns into a negation ("no X to suggest Y").
NEGATED_BY_PRECEDING = {"suggest", "suggests", "suggesting", "suggestive of", "concerning for",
                        "suspicious for", "likely", "probable"}
CLAUSE_BREAKS = [
    "but", "however", "although", "though", "except", "other than", "aside from", "apart from",
    "whereas", "while", "which", "yet", "there is", "there are", "there has been", ";", ":",
]
PRE_WINDOW, POST_WINDOW = 15, 6  # words between cue and mention

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_SENT = re.compile(r"[^.?!\n]+(?:[.?!](?=\s|$)|\n|$)|[.?!]", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\bX{3,}\b", re.IGNORECASE)


@dataclass
class Mention:
    """One class mention found in a report, for debugging the labeler."""

    cls: str
    start: int
    end: int
    status: int
    sentence: str


def _plural(word: str) -> str:
    """Regex for a word and its plural forms."""
    w = re.escape(word)
    if word.endswith("sis"):
        return re.escape(word[:-3]) + "(?:sis|ses)"
    if word.endswith("ax"):
        return re.escape(word[:-2]) + "(?:ax|axes|aces)"
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return re.escape(word[:-1]) + "(?:y|ies)"
    if word.endswith("ma"):
        return w + "(?:s|ta)?"
    if word.endswith(("s", "x", "ch", "sh")):
        return w + "(?:es)?"
    return w + "s?"


def _phrase_regex(phrase: str) -> str:
    """Regex body for a knowledge-base phrase: spaces -> any whitespace, '*' -> a short word gap."""
    parts = phrase.split(" * ")
    out = []
    for part in parts:
        words = part.split()
        body = [re.escape(w) for w in words[:-1]] + [_plural(words[-1])] if words else []
        out.append(r"\s+".join(body))
    return r"(?:\s+[a-z0-9'-]+){0,3}\s+".join(out)


def _alternation(phrases: Iterable[str]) -> str:
    """Longest-first alternation so the longest phrase wins at a given position."""
    return "|".join(sorted(set(phrases), key=lambda p: (-len(p), p)))


def _cue_regex(cues: Iterable[str]) -> str:
    return _alternation(r"\s+".join(re.escape(w) for w in c.split()) for c in cues)


class ReportLabeler:
    """Label free-text reports with the knowledge base's classes (see module docstring)."""

    def __init__(self, knowledge: KnowledgeBase | None = None):
        self.kb = knowledge if knowledge is not None else load_knowledge()
        self.classes = self.kb.classes
        # phrase -> [(class, kind)]: one phrase may name several classes ("calcified nodule")
        owners: dict[str, list[tuple[str, str]]] = {}
        for name in self.classes:
            entry = self.kb.entries[name]
            if name == NO_FINDING:  # derived from the others, its synonyms are not mentions
                continue
            for kind, phrases in (("pos", entry.synonyms), ("neg", entry.negative_phrases),
                                  ("excl", entry.exclusions)):
                for phrase in phrases:
                    owners.setdefault(phrase, []).append((name, kind))
        self._group_info = {}
        by_initial: dict[str, list[str]] = {}
        for gi, phrase in enumerate(sorted(owners, key=lambda p: (-len(p), p))):
            self._group_info[f"g{gi}"] = owners[phrase]
            by_initial.setdefault(phrase[0], []).append(f"(?P<g{gi}>{_phrase_regex(phrase)})")
        # dispatch on the first letter so each word start tries a few phrases, not all (speed)
        branches = [f"(?={re.escape(ch)})(?:{'|'.join(alts)})" for ch, alts in sorted(by_initial.items())]
        self._mention_re = re.compile(r"(?<![a-z0-9-])(?:" + "|".join(branches) + r")(?![a-z0-9])")
        uncertain_neg = [c for c in UNCERTAINTY + POST_UNCERTAINTY if re.search(r"\b(not|no|cannot)\b", c)]
        self._cue_re = re.compile(
            r"(?<![a-z0-9'-])(?:"
            f"(?P<unc_both>{_cue_regex(uncertain_neg)})"
            f"|(?P<neg_post>{_cue_regex([c for c in POST_NEGATION if ' ' in c])})"
            f"|(?P<unc_post>{_cue_regex([c for c in POST_UNCERTAINTY if ' ' in c])})"
            f"|(?P<neg_pre>{_cue_regex(PRE_NEGATION)})"
            f"|(?P<neg_post1>{_cue_regex([c for c in POST_NEGATION if ' ' not in c])})"
            f"|(?P<unc_pre>{_cue_regex(UNCERTAINTY)})"
            r")(?![a-z0-9'-])")
        self._single_post_neg = {c for c in POST_NEGATION if " " not in c}
        self._single_post_unc = {c for c in POST_UNCERTAINTY if " " not in c}
        words = [c for c in CLAUSE_BREAKS if c[0].isalpha()]
        punct = "".join(re.escape(c) for c in CLAUSE_BREAKS if not c[0].isalpha())
        self._break_re = re.compile(r"[" + punct + r"]|(?<![a-z0-9])(?:" + _cue_regex(words) + r")(?![a-z0-9])")

    # -- public API ---------------------------------------------------------------------------
    def label(self, text: str | None) -> dict[str, int]:
        """Class -> POSITIVE / NEGATIVE / UNCERTAIN / MISSING for one report."""
        if not text or not re.search(r"[A-Za-z0-9]", _PLACEHOLDER.sub(" ", text)):
            return {c: MISSING for c in self.classes}
        out = {c: MISSING for c in self.classes}
        rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, MISSING: 0}
        for m in self.mentions(text):
            if rank[m.status] > rank[out[m.cls]]:
                out[m.cls] = m.status
        if NO_FINDING in out:
            abnormal = any(v in (POSITIVE, UNCERTAIN) for c, v in out.items() if c != NO_FINDING)
            out[NO_FINDING] = NEGATIVE if abnormal else POSITIVE
        return out

    def label_many(self, texts: Iterable[str | None]) -> list[dict[str, int]]:
        return [self.label(t) for t in texts]

    def mentions(self, text: str | None) -> list[Mention]:
        """Every class mention with its status and the sentence it was found in."""
        if not text:
            return []
        low = _PLACEHOLDER.sub(lambda m: " " * len(m.group()), text).lower()
        found: list[Mention] = []
        for sent in _SENT.finditer(low):
            found.extend(self._sentence_mentions(low, sent.start(), sent.end(), text))
        return found

    # -- internals ----------------------------------------------------------------------------
    def _sentence_mentions(self, low: str, s0: int, s1: int, original: str) -> list[Mention]:
        sent = low[s0:s1]
        hits = []
        for m in self._mention_re.finditer(sent):
            for cls, kind in self._group_info[m.lastgroup]:
                if kind != "excl":
                    hits.append((cls, kind, m.start(), m.end()))
        if not hits:
            return []
        breaks = [b.start() for b in self._break_re.finditer(sent)]
        cues = [(c.lastgroup, c.start(), c.end(), c.group()) for c in self._cue_re.finditer(sent)]
        word_starts = [w.start() for w in _WORD.finditer(sent)]
        out = []
        for cls, kind, a, b in hits:
            status = NEGATIVE if kind == "neg" else self._status(a, b, cues, breaks, word_starts)
            out.append(Mention(cls=cls, start=s0 + a, end=s0 + b, status=status,
                               sentence=original[s0:s1].strip()))
        return out

    def _status(self, a: int, b: int, cues, breaks, word_starts) -> int:
        clause_lo = max([x for x in breaks if x <= a], default=0)
        clause_hi = min([x for x in breaks if x >= b], default=10**9)
        best, best_dist, best_cue = POSITIVE, None, None
        for group, c0, c1, cue in cues:
            if c0 < clause_lo or c1 > clause_hi:
                continue
            inside = c0 >= a and c1 <= b
            if c1 <= a:  # cue before the mention: pre cues (and post cues that also read forward)
                direction = "pre"
                dist = _words_between(word_starts, c1, a)
            elif c0 >= b:
                direction = "post"
                dist = _words_between(word_starts, b, c0)
            elif inside:
                direction, dist = "inside", 0
            else:
                continue
            status = _cue_effect(group, direction, cue, self._single_post_neg, self._single_post_unc)
            if status is None:
                continue
            limit = PRE_WINDOW if direction == "pre" else POST_WINDOW
            if dist > limit:
                continue
            if best_dist is None or dist < best_dist:
                best, best_dist, best_cue = status, dist, (group, direction, c0, " ".join(cue.split()))
        if best == UNCERTAIN and best_cue[1] == "pre" and best_cue[3] in NEGATED_BY_PRECEDING:
            # "no focal opacity to suggest pneumonia": the negation governs the hedge
            c0 = best_cue[2]
            if any(g == "neg_pre" and clause_lo <= x1 <= c0 and _words_between(word_starts, x1, a) <= PRE_WINDOW
                   for g, _, x1, _ in cues):
                return NEGATIVE
        return best


def _words_between(word_starts: list[int], lo: int, hi: int) -> int:
    return sum(1 for w in word_starts if lo <= w < hi)


def _cue_effect(group: str, direction: str, cue: str, single_neg: set, single_unc: set) -> int | None:
    """The status a cue imposes from where it stands relative to the mention, or None."""
    cue = " ".join(cue.split())
    if group == "unc_both":
        return UNCERTAIN
    if group in ("neg_pre",):
        if direction in ("pre", "inside"):
            return NEGATIVE
        # a word that is both a pre and a post cue ("resolved", "absent") read backwards
        return NEGATIVE if cue in single_neg else None
    if group in ("neg_post", "neg_post1"):
        return NEGATIVE if direction in ("post", "inside") else None
    if group == "unc_post":
        return UNCERTAIN if direction in ("post", "inside") else None
    if group == "unc_pre":
        if direction in ("pre", "inside"):
            return UNCERTAIN
        return UNCERTAIN if cue in single_unc else None
    return None
