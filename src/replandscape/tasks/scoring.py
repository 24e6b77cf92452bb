"""Scoring a generated continuation against the gold answer.

``strict`` (the default): the continuation, stripped of leading spaces, starts with the gold
string and the next character (if any) is not a letter or digit, so ``15`` does not count for
``5`` and ``Trueish`` does not count for ``True``. ``substring``: the gold string occurs anywhere
in the continuation (the original rule, kept for comparison). Both are reported.
"""

from __future__ import annotations

from collections.abc import Callable

from replandscape.errors import UserError


def score_strict(continuation: str, target: str) -> bool:
    """True when the continuation (leading spaces stripped) starts with ``target`` as a whole
    token: the next character is not a letter or digit."""
    text = continuation.lstrip(" ")
    if not text.startswith(target):
        return False
    rest = text[len(target):]
    return not rest or not rest[0].isalnum()


def score_substring(continuation: str, target: str) -> bool:
    """True when ``target`` occurs anywhere in the continuation."""
    return target in continuation


SCORERS: dict[str, Callable[[str, str], bool]] = {"strict": score_strict,
                                                  "substring": score_substring}
DEFAULT_SCORING = "strict"


def score(continuation: str, target: str, rule: str = DEFAULT_SCORING) -> bool:
    """Score with the named rule (``strict`` or ``substring``)."""
    try:
        scorer = SCORERS[rule]
    except KeyError:
        raise UserError(f"unknown scoring rule '{rule}'", key="scoring",
                        fix=f"use one of {', '.join(SCORERS)}") from None
    return scorer(continuation, target)


def score_all(continuation: str, target: str) -> dict[str, bool]:
    """Every rule's verdict, so both can be reported."""
    return {rule: scorer(continuation, target) for rule, scorer in SCORERS.items()}
