"""Clinical negation cues: find them in report text, map them to tokens, flip them.

The lexicon follows the *idea* of NegEx (Chapman et al. 2001, J Biomed Inform 34:301):
trigger phrases that precede ("pre") or follow ("post") the finding they negate, plus
pseudo-negations ("no change", "cannot be ruled out") that contain a negation word but
must not be reported as negation. The phrases themselves are this module's own.

Matching
    Case-insensitive and whole-word: a cue may not touch a letter, digit, underscore or
    hyphen on either side, so "no" does not fire inside "non-enlarged" or "no-reflow".
    Words of a multi-word cue may be separated by any whitespace, line breaks included.
    Cues with ``attach="suffix"`` ("n't") must instead follow a letter, so the match covers
    only the clitic of "isn't" / "doesn't". When candidates overlap, the longest wins
    ("no evidence of" over "no", "cannot be ruled out" over "ruled out"); pseudo
    negations take part in this contest and are then dropped from the result.

Scope (NegEx's window, simplified)
    A "pre" cue negates the words after it, a "post" cue the words before it, up to
    ``Lexicon.max_scope_words`` (default 6) words. The window stops early at

    * punctuation ``. , ; : ! ? ( ) [ ] { }`` (a period between digits, "1.5", does not count),
    * a blank line, or a new line starting with a list bullet (``-``, ``*``, ``•``);
      a single line break does not stop it, because reports are hard-wrapped mid-sentence,
    * a conjunction or relative word that opens a new clause: but, however, although,
      though, yet, except, aside, apart, whereas, while, which, who, whose, that,
    * a form of "be"/"have" (is, are, was, were, be, been, being, has, have, had), so
      "No effusion is seen" negates "effusion",
    * any other cue, pseudo-negations included.

    "and", "or" and "with" do not stop it: "no pleural effusion or pneumothorax" negates
    both findings. A "post" cue first steps back over adjacent auxiliaries and a few
    adverbs ("has since resolved", "has been removed") and over a label colon, so
    "Effusion: absent" negates "Effusion". An empty window gives an empty subject span
    at the cue's edge.

Lexicon choices
    Normality statements ("unremarkable", "within normal limits") say a whole organ is
    normal rather than that a finding is absent, so they live in ``NORMALITY_CUES`` and are
    opt-in: ``DEFAULT_LEXICON.with_cues(NORMALITY_CUES)``. "removed" (a device taken out)
    and "resolved" (a finding gone) are in the default lexicon under their own
    categories, so callers can filter them out by ``Cue.category``. "cannot" alone is not
    a cue: its common clinical uses ("cannot be excluded") are uncertainty, listed as
    pseudo-negations.

Counterparts
    Each negation cue lists affirmative replacements, most preferred first, for building
    minimal pairs. They are candidates only; whether a replacement keeps the token count
    of a given tokenizer is checked elsewhere. "no" offers "a" first; pass
    ``fix_article=True`` to ``make_affirmative`` to get "an" before a vowel letter
    ("an effusion"). "a" and "an" are each one token in CLIP's BPE and in WordPiece, so
    this never changes the token count. "n't" offers " indeed" ("isn't enlarged" ->
    "is indeed enlarged") and "" ("is enlarged"); "can't" gets "n indeed"/"n" so the
    result reads "can indeed"; "won't", "shan't" and "ain't" get none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

__all__ = [
    "Cue",
    "CueMatch",
    "Lexicon",
    "DEFAULT_LEXICON",
    "DEFAULT_MAX_SCOPE_WORDS",
    "NORMALITY_CUES",
    "find_cues",
    "require_cue",
    "counterpart_candidates",
    "make_affirmative",
    "token_positions",
]

CueKind = Literal["pre", "post", "pseudo"]
Attach = Literal["word", "suffix"]
_KINDS = ("pre", "post", "pseudo")
_ATTACHES = ("word", "suffix")

DEFAULT_MAX_SCOPE_WORDS = 6


@dataclass(frozen=True)
class Cue:
    """A negation trigger phrase.

    ``text`` is the canonical lowercase phrase (words separated by single spaces; "'" also
    matches the typographic apostrophe). ``kind`` says where the negated subject sits
    ("pre": after the cue, "post": before it) or marks a pseudo-negation. ``counterparts``
    are affirmative replacements, most preferred first. ``category`` groups cues
    ("absence", "grammatical", "exclusion", ...). ``attach="suffix"`` makes the cue match
    as the end of a word ("n't" in "isn't").
    """

    text: str
    kind: CueKind
    counterparts: tuple[str, ...] = ()
    category: str = "absence"
    attach: Attach = "word"

    def __post_init__(self) -> None:
        canonical = " ".join(self.text.lower().split())
        if not canonical:
            raise ValueError("Cue text must not be empty")
        if self.kind not in _KINDS:
            raise ValueError(f"Cue kind must be one of {_KINDS}, got {self.kind!r}")
        if self.attach not in _ATTACHES:
            raise ValueError(f"Cue attach must be one of {_ATTACHES}, got {self.attach!r}")
        if isinstance(self.counterparts, str):
            raise TypeError(f"Cue counterparts must be a sequence of strings, got the string {self.counterparts!r}")
        object.__setattr__(self, "text", canonical)
        object.__setattr__(self, "counterparts", tuple(self.counterparts))

    @property
    def is_negation(self) -> bool:
        return self.kind != "pseudo"


@dataclass(frozen=True)
class CueMatch:
    """One cue found in a text; all offsets are character offsets, end exclusive.

    ``text`` is the matched surface (``original[start:end]``); ``subject_start`` /
    ``subject_end`` delimit the negated words chosen by the scope rule.
    """

    cue: Cue
    start: int
    end: int
    text: str
    subject_start: int
    subject_end: int

    @property
    def span(self) -> tuple[int, int]:
        return (self.start, self.end)

    @property
    def subject_span(self) -> tuple[int, int]:
        return (self.subject_start, self.subject_end)


@dataclass(frozen=True)
class Lexicon:
    """An immutable set of cues, keyed by canonical text (one cue per text)."""

    cues: tuple[Cue, ...]
    max_scope_words: int = DEFAULT_MAX_SCOPE_WORDS
    _by_text: dict[str, Cue] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_scope_words < 0:
            raise ValueError(f"max_scope_words must be >= 0, got {self.max_scope_words}")
        by_text: dict[str, Cue] = {}
        for cue in self.cues:
            by_text[cue.text] = cue  # a later cue with the same text replaces the earlier one
        object.__setattr__(self, "cues", tuple(by_text.values()))
        object.__setattr__(self, "_by_text", by_text)

    def with_cues(self, cues: Iterable[Cue]) -> Lexicon:
        """A new lexicon with ``cues`` added; a cue whose text is already known replaces it."""
        return Lexicon((*self.cues, *cues), self.max_scope_words)

    def without(self, *texts: str) -> Lexicon:
        """A new lexicon lacking the cues with these texts (unknown texts are an error)."""
        drop = {" ".join(t.lower().split()) for t in texts}
        unknown = drop - self._by_text.keys()
        if unknown:
            raise KeyError(f"Not in the lexicon: {sorted(unknown)}")
        return Lexicon(tuple(c for c in self.cues if c.text not in drop), self.max_scope_words)

    def get(self, text: str) -> Cue | None:
        return self._by_text.get(" ".join(text.lower().split()))

    @property
    def negation_cues(self) -> tuple[Cue, ...]:
        return tuple(c for c in self.cues if c.is_negation)

    @property
    def pseudo_cues(self) -> tuple[Cue, ...]:
        return tuple(c for c in self.cues if not c.is_negation)

    def __len__(self) -> int:
        return len(self.cues)

    def __iter__(self) -> Iterator[Cue]:
        return iter(self.cues)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.get(text) is not None

    @cached_property
    def _patterns(self) -> tuple[tuple[Cue, re.Pattern[str]], ...]:
        return tuple((cue, _compile(cue)) for cue in self.cues)


def _compile(cue: Cue) -> re.Pattern[str]:
    words = [re.escape(w).replace("'", "['’]") for w in cue.text.split(" ")]
    body = r"\s+".join(words)
    before = r"(?<=[^\W\d_])" if cue.attach == "suffix" else r"(?<![\w-])"
    return re.compile(before + body + r"(?![\w-])", re.IGNORECASE)


# --------------------------------------------------------------------------- lexicon


def _pre(text: str, *counterparts: str, category: str = "absence", attach: Attach = "word") -> Cue:
    return Cue(text, "pre", counterparts, category, attach)


def _post(text: str, *counterparts: str, category: str = "absence") -> Cue:
    return Cue(text, "post", counterparts, category)


def _pseudo(text: str, category: str, attach: Attach = "word") -> Cue:
    return Cue(text, "pseudo", (), category, attach)


_NEGATION_CUES = (
    # absence of a finding, cue before it
    _pre("no", "a", "some", "the"),
    _pre("without", "with"),
    _pre("without evidence of", "with evidence of"),
    _pre("absence of", "presence of"),
    _pre("free of", "full of", "suggestive of"),
    _pre("clear of", "full of"),
    _pre("no evidence of", "clear evidence of", "some evidence of"),
    _pre("no evidence for", "clear evidence for", "some evidence for"),
    _pre("no sign of", "a sign of", "some sign of"),
    _pre("no signs of", "some signs of", "clear signs of"),
    _pre("no findings of", "some findings of", "clear findings of"),
    # absence, cue after the finding
    _post("absent", "present"),
    _post("none", "some", "several"),
    _post("not seen", "well seen", "clearly seen", "now seen"),
    _post("not identified", "clearly identified", "now identified"),
    _post("not visualized", "well visualized", "clearly visualized"),
    _post("not visualised", "well visualised", "clearly visualised"),
    _post("not present", "clearly present", "now present"),
    _post("not demonstrated", "clearly demonstrated"),
    _post("not appreciated", "clearly appreciated"),
    _post("not evident", "clearly evident"),
    _post("not detected", "clearly detected"),
    # grammatical negation
    _pre("not", "indeed", "now", "also", category="grammatical"),
    _pre("n't", " indeed", "", category="grammatical", attach="suffix"),
    _pre("never", "often", "always", category="grammatical"),
    _pre("neither", "both", "either", category="grammatical"),
    _pre("nor", "and", "or", category="grammatical"),
    # a finding tested for and excluded
    _pre("negative for", "positive for", category="exclusion"),
    _post("negative", "positive", category="exclusion"),
    _post("ruled out", "confirmed", "ruled in", category="exclusion"),
    _pre("rules out", "confirms", "rules in", category="exclusion"),
    _post("excluded", "confirmed", category="exclusion"),
    # patient report
    _pre("denies", "reports", "endorses", category="report"),
    # a finding that has gone
    _post("resolved", "persisted", "developed", "progressed", category="resolution"),
    _pre("resolution of", "persistence of", "progression of", category="resolution"),
    _post("no longer", "still", "now", category="resolution"),
    # a device taken out
    _post("removed", "placed", "inserted", category="removal"),
)

_PSEUDO_CUES = (
    # stability statements: "no change in the effusion" asserts the effusion
    *(_pseudo(t, "stability") for t in (
        "no change", "no changes", "no interval change", "no significant change",
        "no significant interval change", "no appreciable change", "no substantial change",
        "no increase", "no decrease", "no significant increase", "no significant decrease",
        "not changed", "not significantly changed", "without change", "without interval change",
        "without significant change",
    )),
    # uncertainty: the finding stays possible
    *(_pseudo(t, "uncertainty") for t in (
        "not ruled out", "not been ruled out", "not be ruled out", "cannot be ruled out",
        "cannot rule out", "not excluded", "not be excluded", "not been excluded",
        "cannot be excluded", "cannot exclude", "not certain", "not clear",
    )),
    *(_pseudo(t, "uncertainty", attach="suffix") for t in (
        "n't be ruled out", "n't rule out", "n't be excluded", "n't exclude",
    )),
    # double negation / partial: the finding is still there
    *(_pseudo(t, "persistence") for t in (
        "not resolved", "not yet resolved", "not completely resolved", "not fully resolved",
        "partially resolved", "incompletely resolved", "not removed", "not been removed",
    )),
    *(_pseudo(t, "persistence", attach="suffix") for t in ("n't resolved", "n't been removed")),
    # idioms in which the negation word negates nothing clinical
    *(_pseudo(t, "idiom") for t in ("not only", "not necessarily", "gram negative", "without difficulty")),
)

NORMALITY_CUES: tuple[Cue, ...] = (
    _post("unremarkable", "abnormal", "remarkable", category="normality"),
    _post("within normal limits", "outside normal limits", category="normality"),
)

DEFAULT_LEXICON = Lexicon(_NEGATION_CUES + _PSEUDO_CUES)


# --------------------------------------------------------------------------- matching


def _scan(text: str, lexicon: Lexicon) -> list[tuple[Cue, int, int]]:
    """All non-overlapping cue occurrences (pseudo ones included), longest first, in text order."""
    candidates = [
        (cue, m.start(), m.end())
        for cue, pattern in lexicon._patterns
        for m in pattern.finditer(text)
    ]
    candidates.sort(key=lambda c: (c[1] - c[2], c[1]))
    taken: list[tuple[Cue, int, int]] = []
    for cand in candidates:
        if all(cand[2] <= s or cand[1] >= e for _, s, e in taken):
            taken.append(cand)
    taken.sort(key=lambda c: c[1])
    return taken


_SCOPE_TOKEN = re.compile(
    r"(?P<word>\w+(?:(?:['’/-]|(?<=\d)\.(?=\d))\w+)*)"
    r"|(?P<brk>\n[ \t\r]*(?:\n|[-*•]))"
    r"|(?P<punct>[.,;:!?()\[\]{}])"
)
_CLAUSE_WORDS = frozenset(
    "but however although though yet except aside apart whereas while which who whose that".split()
)
_BE_HAVE = frozenset("is are was were be been being has have had".split())
_STOP_WORDS = _CLAUSE_WORDS | _BE_HAVE
# Skipped between a post cue and its subject: "has since resolved", "has been removed".
_POST_GAP_WORDS = _BE_HAVE | frozenset(
    "now since also completely entirely essentially largely nearly fully".split()
)


@dataclass(frozen=True)
class _Tok:
    kind: str  # "word", "brk" or "punct"
    start: int
    end: int
    lower: str


def _scope_tokens(text: str) -> list[_Tok]:
    return [
        _Tok(m.lastgroup or "", m.start(), m.end(), m.group().lower().replace("’", "'"))
        for m in _SCOPE_TOKEN.finditer(text)
    ]


def _is_stop(tok: _Tok) -> bool:
    return tok.kind != "word" or tok.lower in _STOP_WORDS


def _pre_subject(toks: list[_Tok], cue_end: int, limit: int, cap: int) -> tuple[int, int]:
    words: list[_Tok] = []
    for tok in toks:
        if tok.start < cue_end:
            continue
        if tok.end > limit or _is_stop(tok) or len(words) == cap:
            break
        words.append(tok)
    return (words[0].start, words[-1].end) if words else (cue_end, cue_end)


def _post_subject(toks: list[_Tok], cue_start: int, limit: int, cap: int) -> tuple[int, int]:
    before = [t for t in reversed(toks) if t.end <= cue_start and t.start >= limit]
    i = 0
    while i < len(before) and before[i].kind == "word" and before[i].lower in _POST_GAP_WORDS:
        i += 1
    if i < len(before) and before[i].lower == ":":
        i += 1
    words: list[_Tok] = []
    for tok in before[i:]:
        if _is_stop(tok) or len(words) == cap:
            break
        words.append(tok)
    return (words[-1].start, words[0].end) if words else (cue_start, cue_start)


def find_cues(text: str, lexicon: Lexicon | None = None) -> list[CueMatch]:
    """Negation cues in ``text`` (pseudo-negations excluded), in text order, with their scope."""
    lexicon = DEFAULT_LEXICON if lexicon is None else lexicon
    found = _scan(text, lexicon)
    toks = _scope_tokens(text)
    matches = []
    for i, (cue, start, end) in enumerate(found):
        if not cue.is_negation:
            continue
        if cue.kind == "pre":
            limit = found[i + 1][1] if i + 1 < len(found) else len(text)
            subject = _pre_subject(toks, end, limit, lexicon.max_scope_words)
        else:
            limit = found[i - 1][2] if i > 0 else 0
            subject = _post_subject(toks, start, limit, lexicon.max_scope_words)
        matches.append(CueMatch(cue, start, end, text[start:end], *subject))
    return matches


_SAMPLE_TEXTS = ("no", "not", "n't", "without", "absent", "negative for", "no evidence of", "ruled out", "resolved")


def _sample_cues(lexicon: Lexicon, size: int = 8) -> list[Cue]:
    preferred = [c for t in _SAMPLE_TEXTS if (c := lexicon.get(t)) is not None and c.is_negation]
    rest = [c for c in lexicon.negation_cues if c not in preferred]
    return (preferred + rest)[:size]


def require_cue(text: str, lexicon: Lexicon | None = None) -> list[CueMatch]:
    """Like ``find_cues`` but raises a ValueError explaining the options when nothing is found."""
    lexicon = DEFAULT_LEXICON if lexicon is None else lexicon
    matches = find_cues(text, lexicon)
    if matches:
        return matches
    sample = ", ".join(repr(c.text) for c in _sample_cues(lexicon))
    pseudo = [text[s:e] for cue, s, e in _scan(text, lexicon) if not cue.is_negation]
    pseudo_note = (
        f" It does contain the pseudo-negation(s) {', '.join(map(repr, pseudo))}, which deliberately "
        "do not count as negation."
        if pseudo else ""
    )
    raise ValueError(
        f"No negation cue found in {text!r}.{pseudo_note} The lexicon knows "
        f"{len(lexicon.negation_cues)} negation cues, e.g. {sample}. To add one, build "
        "DEFAULT_LEXICON.with_cues([Cue('lacks', 'pre', ('has',))]) and pass it as lexicon=. "
        "Otherwise pass corrupt= explicitly, or supply your own affirmative foil text."
    )


# --------------------------------------------------------------------------- minimal pairs

_HOSTS_WITHOUT_COUNTERPART = ("wo", "sha", "ai")  # won't, shan't, ain't


def counterpart_candidates(match: CueMatch, text: str | None = None) -> tuple[str, ...]:
    """Affirmative replacements for ``match.text``, most preferred first (may be empty).

    Pass the matched ``text`` to get the right candidates for irregular contractions:
    "can't" -> ("n indeed", "n"); "won't", "shan't", "ain't" -> () since no edit of the
    clitic alone makes them affirmative.
    """
    if text is not None and match.cue.attach == "suffix":
        host = re.search(r"[^\W\d_]+$", text[: match.start])
        base = host.group().lower() if host else ""
        if base in _HOSTS_WITHOUT_COUNTERPART:
            return ()
        if base == "ca":
            return ("n indeed", "n")
    return match.cue.counterparts


def _match_case(surface: str, replacement: str) -> str:
    letters = [ch for ch in surface if ch.isalpha()]
    if len(letters) > 1 and all(ch.isupper() for ch in letters):
        return replacement.upper()
    if letters and letters[0].isupper():
        for i, ch in enumerate(replacement):
            if ch.isalpha():
                return replacement[:i] + ch.upper() + replacement[i + 1 :]
    return replacement


def _article_for(text: str, pos: int) -> str:
    following = re.match(r"\s*([^\W\d_])", text[pos:])
    return "an" if following and following.group(1).lower() in "aeiou" else "a"


def make_affirmative(
    text: str, match: CueMatch, replacement: str, *, fix_article: bool = False
) -> tuple[str, tuple[int, int]]:
    """Replace the cue's surface in ``text``; return the new text and the replacement's span.

    The first letter's capitalisation is carried over ("No" -> "A"); an all-caps cue gives
    an all-caps replacement. With ``fix_article=True`` a replacement of "a"/"an" becomes
    whichever the next word's first letter calls for (vowel letter -> "an"; "an hour" or
    "a unilateral" are not special-cased).
    """
    if text[match.start : match.end] != match.text:
        raise ValueError(
            f"match {match.text!r} at {match.span} does not belong to this text "
            f"(found {text[match.start:match.end]!r} there)"
        )
    if fix_article and replacement.lower() in ("a", "an"):
        replacement = _article_for(text, match.end)
    replacement = _match_case(match.text, replacement)
    new_text = text[: match.start] + replacement + text[match.end :]
    return new_text, (match.start, match.start + len(replacement))


def token_positions(match_span: tuple[int, int], offsets: list[tuple[int, int] | None]) -> list[int]:
    """Indices of the tokens whose character span overlaps ``match_span`` (end exclusive).

    ``offsets`` holds one (start, end) per token in the same string the match came from;
    ``None`` marks special tokens, and zero-width spans (Hugging Face reports (0, 0) for
    specials) never overlap anything. A cue split over several pieces yields all of them, a
    piece that also covers neighbouring characters (a leading space, "isn" + "'t") counts
    as soon as it overlaps. An empty ``match_span`` yields no tokens.
    """
    start, end = match_span
    if start > end:
        raise ValueError(f"match span {match_span} has start after end")
    if start == end:
        return []
    return [
        i
        for i, span in enumerate(offsets)
        if span is not None and span[0] < span[1] and span[0] < end and span[1] > start
    ]
