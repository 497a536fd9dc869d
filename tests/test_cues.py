import dataclasses

import pytest

from negtrace.negation.cues import (
    DEFAULT_LEXICON,
    NORMALITY_CUES,
    Cue,
    CueMatch,
    Lexicon,
    counterpart_candidates,
    find_cues,
    make_affirmative,
    require_cue,
    token_positions,
)


def only(text: str, lexicon: Lexicon | None = None) -> CueMatch:
    matches = find_cues(text, lexicon)
    assert len(matches) == 1, matches
    return matches[0]


def subject(text: str, match: CueMatch) -> str:
    return text[match.subject_start : match.subject_end]


# --------------------------------------------------------------------------- detection

@pytest.mark.parametrize(
    "text, surface, kind, subj",
    [
        ("No pleural effusion.", "No", "pre", "pleural effusion"),
        ("There is no evidence of pneumothorax.", "no evidence of", "pre", "pneumothorax"),
        ("Lungs are clear without focal consolidation.", "without", "pre", "focal consolidation"),
        ("Pneumothorax has resolved.", "resolved", "post", "Pneumothorax"),
        ("Heart size isn't enlarged.", "n't", "pre", "enlarged"),
        ("No large effusion on the right.", "No", "pre", "large effusion on the right"),
        ("Negative for acute fracture.", "Negative for", "pre", "acute fracture"),
        ("Free of consolidation.", "Free of", "pre", "consolidation"),
        ("Effusion absent.", "absent", "post", "Effusion"),
        ("The effusion is not seen on the lateral view.", "not seen", "post", "The effusion"),
        ("The chest tube has been removed.", "removed", "post", "The chest tube"),
        ("Pulmonary embolism was ruled out.", "ruled out", "post", "Pulmonary embolism"),
        ("Effusion has since resolved.", "resolved", "post", "Effusion"),
        ("Effusion: none.", "none", "post", "Effusion"),
        ("Effusion is no longer present.", "no longer", "post", "Effusion"),
        ("Patient denies chest pain.", "denies", "pre", "chest pain"),
        ("Absence of pleural effusion.", "Absence of", "pre", "pleural effusion"),
        ("Lungs are clear of consolidation.", "clear of", "pre", "consolidation"),
        ("Heart is not enlarged.", "not", "pre", "enlarged"),
        ("There is no sign of pneumonia.", "no sign of", "pre", "pneumonia"),
        ("No effusion is seen.", "No", "pre", "effusion"),
    ],
)
def test_single_cue(text, surface, kind, subj):
    m = only(text)
    assert m.text == surface == text[m.start : m.end]
    assert m.cue.kind == kind
    assert subject(text, m) == subj


@pytest.mark.parametrize(
    "text",
    [
        "No change in the small left effusion.",
        "No interval change in cardiomegaly.",
        "Pneumonia cannot be ruled out.",
        "Pneumonia couldn't be excluded.",
        "Effusion has not resolved.",
        "The effusion has partially resolved.",
        "Gram negative rods were isolated.",
        "Heart size is normal.",
        "Non-enlarged heart.",
        "No-reflow phenomenon.",
        "Cannot rule out pneumonia.",
    ],
)
def test_pseudo_negations_and_non_cues_are_not_reported(text):
    assert find_cues(text) == []


def test_scope_covers_coordination_and_stops_at_but():
    text = "No pleural effusion or pneumothorax, but there is a small nodule."
    m = only(text)
    assert subject(text, m) == "pleural effusion or pneumothorax"
    assert m.subject_span == (3, 35)


def test_scope_is_capped():
    text = "No focal airspace consolidation in either lung base or apex"
    m = only(text)
    assert subject(text, m) == "focal airspace consolidation in either lung"
    narrow = Lexicon(DEFAULT_LEXICON.cues, max_scope_words=2)
    assert subject(text, only(text, narrow)) == "focal airspace"


def test_scope_stops_at_next_cue_and_clause_words():
    text = "Neither effusion nor pneumothorax, which resolved."
    first, second, third = find_cues(text)
    assert (first.text, subject(text, first)) == ("Neither", "effusion")
    assert (second.text, subject(text, second)) == ("nor", "pneumothorax")
    assert (third.text, subject(text, third)) == ("resolved", "")
    assert third.subject_span == (third.start, third.start)


def test_empty_scope_sits_at_cue_edge():
    m = only("No.")
    assert m.subject_span == (2, 2)


def test_longest_match_wins():
    m = only("No evidence of effusion.")
    assert m.text == "No evidence of" and m.cue.text == "no evidence of"
    m = only("Pneumothorax not identified.")
    assert m.cue.text == "not identified"


def test_multiple_cues_in_text_order():
    text = "No effusion; pneumothorax has resolved. Heart isn't enlarged."
    matches = find_cues(text)
    assert [m.text for m in matches] == ["No", "resolved", "n't"]
    assert [m.start for m in matches] == sorted(m.start for m in matches)
    assert [subject(text, m) for m in matches] == ["effusion", "pneumothorax", "enlarged"]


def test_line_breaks():
    text = "There is no\npleural effusion.\n\nNo evidence\nof pneumothorax\n\nCardiomegaly."
    first, second = find_cues(text)
    assert subject(text, first) == "pleural effusion"
    assert second.text == "No evidence\nof" and second.cue.text == "no evidence of"
    assert subject(text, second) == "pneumothorax"


def test_blank_line_and_bullet_end_scope():
    text = "No effusion\n\nCardiomegaly\n- No pneumothorax\n- Atelectasis"
    first, second = find_cues(text)
    assert subject(text, first) == "effusion"
    assert subject(text, second) == "pneumothorax"


def test_decimal_point_does_not_end_scope():
    text = "No nodule over 1.5 cm."
    assert subject(text, only(text)) == "nodule over 1.5 cm"


@pytest.mark.parametrize("word", ["isn't", "doesn't", "aren't", "wasn't", "ISN'T", "isn’t"])
def test_contractions_point_at_the_clitic(word):
    text = f"The heart {word} enlarged."
    m = only(text)
    assert m.cue.text == "n't" and m.text.lower() in ("n't", "n’t")
    assert text[m.end - 3 : m.end] == m.text
    assert text[m.start - 2 : m.start].lower() in ("is", "es", "re", "as")
    assert subject(text, m) == "enlarged"


def test_case_insensitive():
    assert only("NO ACUTE DISEASE").cue.text == "no"
    assert only("nEgAtIvE fOr fracture").cue.text == "negative for"


def test_no_overlaps():
    for text in ["No evidence of effusion, no sign of pneumothorax; lungs free of consolidation."]:
        matches = find_cues(text)
        for a, b in zip(matches, matches[1:], strict=False):
            assert a.end <= b.start


# --------------------------------------------------------------------------- lexicon

def test_lexicon_basics():
    assert len(DEFAULT_LEXICON) > 60
    assert "no evidence of" in DEFAULT_LEXICON and "No  Evidence of" in DEFAULT_LEXICON
    assert DEFAULT_LEXICON.get("unremarkable") is None
    assert {c.kind for c in DEFAULT_LEXICON} == {"pre", "post", "pseudo"}
    assert all(c.counterparts for c in DEFAULT_LEXICON.negation_cues)
    assert all(not c.counterparts for c in DEFAULT_LEXICON.pseudo_cues)


def test_with_cues_extends_and_replaces():
    assert find_cues("Lungs lack consolidation.") == []
    lex = DEFAULT_LEXICON.with_cues([Cue("lack", "pre", ("have",))])
    text = "Lungs lack consolidation."
    assert subject(text, only(text, lex)) == "consolidation"
    assert len(lex) == len(DEFAULT_LEXICON) + 1
    replaced = lex.with_cues([Cue("no", "pre", ("one",))])
    assert replaced.get("no").counterparts == ("one",)
    assert len(replaced) == len(lex)
    assert DEFAULT_LEXICON.get("no").counterparts[0] == "a"


def test_normality_cues_are_opt_in():
    text = "Cardiomediastinal silhouette is unremarkable."
    assert find_cues(text) == []
    m = only(text, DEFAULT_LEXICON.with_cues(NORMALITY_CUES))
    assert m.cue.category == "normality"
    assert subject(text, m) == "Cardiomediastinal silhouette"


def test_without_removes_cues():
    lex = DEFAULT_LEXICON.without("removed")
    assert find_cues("The chest tube has been removed.", lex) == []
    with pytest.raises(KeyError):
        DEFAULT_LEXICON.without("nonexistent cue")


def test_cue_validation_and_frozen():
    with pytest.raises(ValueError):
        Cue("no", "before")
    with pytest.raises(ValueError):
        Cue("  ", "pre")
    with pytest.raises(TypeError):
        Cue("no", "pre", "a")
    cue = Cue("  No   Evidence ", "pre", ["some evidence"])
    assert cue.text == "no evidence" and cue.counterparts == ("some evidence",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cue.text = "x"


# --------------------------------------------------------------------------- minimal pairs

@pytest.mark.parametrize(
    "text, first",
    [
        ("No pleural effusion.", "a"),
        ("Lungs are clear without focal consolidation.", "with"),
        ("Effusion absent.", "present"),
        ("Negative for acute fracture.", "positive for"),
        ("There is no evidence of pneumothorax.", "clear evidence of"),
        ("Pneumothorax has resolved.", "persisted"),
        ("Heart size isn't enlarged.", " indeed"),
        ("Pulmonary embolism was ruled out.", "confirmed"),
        ("Effusion: none.", "some"),
    ],
)
def test_counterparts(text, first):
    assert counterpart_candidates(only(text))[0] == first


def test_contraction_counterparts_need_the_text_for_irregulars():
    text = "Effusion can't be seen."
    m = only(text)
    assert counterpart_candidates(m, text) == ("n indeed", "n")
    assert make_affirmative(text, m, "n indeed")[0] == "Effusion can indeed be seen."
    assert counterpart_candidates(only("It won't resolve."), "It won't resolve.") == ()
    assert counterpart_candidates(m) == m.cue.counterparts


def test_make_affirmative_keeps_capitalisation_and_reports_span():
    text = "No effusion."
    new, span = make_affirmative(text, only(text), "a")
    assert new == "A effusion." and span == (0, 1) and new[slice(*span)] == "A"
    text = "NO ACUTE DISEASE"
    assert make_affirmative(text, only(text), "a")[0] == "A ACUTE DISEASE"
    text = "NEGATIVE FOR FRACTURE"
    assert make_affirmative(text, only(text), "positive for")[0] == "POSITIVE FOR FRACTURE"
    text = "There is no effusion."
    assert make_affirmative(text, only(text), "a")[0] == "There is a effusion."


def test_make_affirmative_articles():
    text = "No effusion."
    assert make_affirmative(text, only(text), "a", fix_article=True)[0] == "An effusion."
    text = "There is no pneumothorax."
    new, span = make_affirmative(text, only(text), "an", fix_article=True)
    assert new == "There is a pneumothorax." and span == (9, 10)


def test_make_affirmative_contraction_and_multiword():
    text = "Heart size isn't enlarged."
    new, span = make_affirmative(text, only(text), " indeed")
    assert new == "Heart size is indeed enlarged." and new[slice(*span)] == " indeed"
    new, span = make_affirmative(text, only(text), "")
    assert new == "Heart size is enlarged." and span == (13, 13)
    text = "There is no evidence of pneumothorax."
    new, span = make_affirmative(text, only(text), "clear evidence of")
    assert new == "There is clear evidence of pneumothorax." and new[slice(*span)] == "clear evidence of"


def test_make_affirmative_rejects_foreign_match():
    m = only("No effusion.")
    with pytest.raises(ValueError, match="does not belong"):
        make_affirmative("Lungs clear.", m, "a")


# --------------------------------------------------------------------------- token positions

def test_token_positions_with_specials_and_word_pieces():
    text = "no pneumothorax."
    # [CLS] no pneu ##mo ##thorax . [SEP]
    offsets = [None, (0, 2), (3, 7), (7, 9), (9, 15), (15, 16), None]
    m = only(text)
    assert token_positions(m.span, offsets) == [1]
    assert token_positions(m.subject_span, offsets) == [2, 3, 4]


def test_token_positions_multiword_cue_and_leading_space_tokens():
    text = "There is no evidence of effusion"
    m = only(text)  # "no evidence of" = chars 9..23
    # byte-level BPE pieces that carry their leading space; lowercased token text does not matter
    offsets = [None, (0, 5), (5, 8), (8, 11), (11, 20), (20, 23), (23, 32), None]
    assert token_positions(m.span, offsets) == [3, 4, 5]


def test_token_positions_contraction_inside_token():
    text = "Heart isn't enlarged"
    m = only(text)  # "n't" = chars 8..11
    assert token_positions(m.span, [None, (0, 5), (6, 9), (9, 11), (12, 20), None]) == [2, 3]
    assert token_positions(m.span, [(0, 5), (6, 11), (12, 20)]) == [1]
    assert token_positions(m.span, [(0, 0), (0, 5), (6, 8), (8, 11), (12, 20), (0, 0)]) == [3]


def test_token_positions_edge_cases():
    assert token_positions((3, 3), [(0, 5)]) == []
    assert token_positions((0, 2), []) == []
    with pytest.raises(ValueError):
        token_positions((5, 2), [(0, 5)])


# --------------------------------------------------------------------------- require_cue

def test_require_cue_returns_matches():
    assert [m.text for m in require_cue("No effusion.")] == ["No"]


def test_require_cue_error_is_helpful():
    with pytest.raises(ValueError) as info:
        require_cue("Heart size is normal.")
    msg = str(info.value)
    assert "'Heart size is normal.'" in msg
    assert "'no'" in msg and "'without'" in msg
    assert "with_cues" in msg and "corrupt=" in msg and "foil" in msg


def test_require_cue_mentions_pseudo_negation():
    with pytest.raises(ValueError, match="pseudo-negation.*'No change'"):
        require_cue("No change in the effusion.")
