"""Position roles, so examples of different lengths can be averaged position by position."""

from __future__ import annotations

import string

PUNCT = set(string.punctuation)


def generic_roles(tokens: list[str], offsets: list, cue: list[int], subject: list[int], pooled: int) -> list[str]:
    """One role per token: start, before cue, cue, first subject, further subject, after,
    final punct, end (start/end are the special tokens; BERT's CLS counts as start)."""
    n = len(tokens)
    roles = []
    first_cue = min(cue) if cue else n
    first_subject = min(subject) if subject else -1
    for i in range(n):
        if i == 0 and offsets[i] is None:
            roles.append("start")
        elif i == n - 1 and offsets[i] is None:
            roles.append("end")
        elif i in cue:
            roles.append("cue")
        elif i == first_subject:
            roles.append("first subject")
        elif i in subject:
            roles.append("further subject")
        elif i == n - 2 and offsets[n - 1] is None and tokens[i].strip() in PUNCT:
            roles.append("final punct")
        elif i < first_cue:
            roles.append("before cue")
        else:
            roles.append("after")
    return roles


def quantmeyer_roles(tokens: list[str]) -> list[str]:
    """The 8 rows of Quantmeyer et al. 2024 for "there is/are a/some/no <subject>." prompts.

    Tokens: [SOT] there is/are a/some/no <subject tokens...> . [EOT]. Raises when a prompt
    does not follow the template.
    """
    words = [t.strip().lower().removeprefix("##") for t in tokens]
    if len(words) < 7 or words[1] != "there" or words[2] not in ("is", "are") or words[-2] != ".":
        raise ValueError(f"prompt tokens {tokens} do not follow 'there is/are a/some/no <subject>.'; "
                         "use scheme='generic'")
    n_subject = len(words) - 6
    return (["[SOT]", "there", "is/are", "a/some/no", "first subject token"]
            + ["further subject tokens"] * (n_subject - 1) + [".", "[EOT]"])
