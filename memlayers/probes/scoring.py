"""Exact-match scoring, as RULER scores its synthetic tasks (no LLM judge).

Both functions compare case-insensitively, after turning control characters into newlines and
stripping the response (RULER's post-processing), so the same response always gets the same score.
"""
from __future__ import annotations

import re
from typing import Sequence

_CONTROL = re.compile(r"[\x00-\x1f]")


def _check(response, expected) -> list:
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if isinstance(expected, str) or not isinstance(expected, Sequence):
        raise TypeError(f"expected must be a list of str, got {type(expected).__name__}")
    if not expected:
        raise ValueError("expected must hold at least one string, got an empty list")
    for e in expected:
        if not isinstance(e, str) or not e.strip():
            raise ValueError(f"expected must hold non-blank strings, got {e!r}")
    return [e.lower() for e in expected]


def normalize(response: str) -> str:
    """RULER's post-processing: control characters become newlines; surrounding space is dropped."""
    return _CONTROL.sub("\n", response).strip()


def string_match_all(response: str, expected: Sequence[str]) -> float:
    """Fraction of the ``expected`` strings found in ``response`` (RULER's ``string_match_all``):
    1.0 when every value is there, partial credit otherwise.

    Example:
        >>> string_match_all("The numbers are 123 and 456.", ["123", "456", "789"])
        0.6666666666666666
    """
    wanted = _check(response, expected)
    text = normalize(response).lower()
    return sum(1.0 for e in wanted if e in text) / len(wanted)


def string_match_part(response: str, expected: Sequence[str]) -> float:
    """1.0 when any of the ``expected`` strings is in ``response`` (RULER's ``string_match_part``,
    used for tasks where one right answer suffices).

    Example:
        >>> string_match_part("It is 456.", ["123", "456"])
        1.0
    """
    wanted = _check(response, expected)
    text = normalize(response).lower()
    return 1.0 if any(e in text for e in wanted) else 0.0


SCORERS = {"string_match_all": string_match_all, "string_match_part": string_match_part}
