"""Haystacks, depth grids, and fitting a prompt to a token budget.

A haystack is a list of word units (a word and the whitespace after it), so a prompt can be grown
one word at a time: that granularity is what keeps prompts within 2% of the requested length even
at a few hundred tokens. The filler ends with a whole sentence wherever one ends within that 2%
(``Haystack.fit``): a fragment such as "There and" before the last needle or the question is text
the public formats never show a model (RULER's and the passkey test's noise filler is whole
sentences), and SmolLM2 answers an in-window passkey after it wrongly where it answers it after a
whole sentence. Needles go at sentence boundaries, placed by token count, not characters.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .formats import NOISE

_SENTENCE_END = (".", "!", "?")
# Prompts are built within this fraction below the requested length.
LENGTH_TOLERANCE = 0.02


def ends_sentence(unit: str) -> bool:
    """Whether a sentence (or a line) ends with the word unit ``unit``."""
    return unit.rstrip().endswith(_SENTENCE_END) or "\n" in unit


def check_tokenizer(tokenizer) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text, add_special_tokens=...) method, got {type(tokenizer).__name__}")


def prompt_tokens(tokenizer, context: str, query: str) -> List[int]:
    """The token ids a model reads: ``context`` with the tokenizer's special tokens (e.g. BOS), then
    ``query`` without them. Probes always encode this way, so lengths, memorization and generation
    agree token for token."""
    return list(tokenizer.encode(context, add_special_tokens=True)) + list(
        tokenizer.encode(query, add_special_tokens=False)
    )


class Haystack:
    """Filler text: RULER's noise sentence repeated (``text=None``) or any text, repeated as needed.

    Example:
        >>> Haystack().units(4)
        ['The ', 'grass ', 'is ', 'green. ']
    """

    def __init__(self, text: Optional[str] = None, source: str = "noise"):
        if text is None:
            text = NOISE
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        words = re.findall(r"\S+\s*", text)
        if not words:
            raise ValueError("text must contain at least one word, got an empty or blank haystack")
        if not words[-1][-1].isspace():  # the copy that follows must not glue onto the last word
            words[-1] += " "
        self._words = words
        self.source = source
        self.digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        self._token_counts: Dict[str, int] = {}

    @classmethod
    def from_file(cls, path) -> "Haystack":
        """The text of a UTF-8 file as the haystack."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"haystack file {str(path)!r} does not exist or is not a file")
        return cls(p.read_text(encoding="utf-8"), source=str(p))

    def describe(self) -> dict:
        return {"source": self.source, "sha256_16": self.digest}

    def units(self, n: int) -> List[str]:
        """The first ``n`` word units, cycling through the text."""
        w = self._words
        return [w[i % len(w)] for i in range(n)]

    def fit(self, measure: Callable[[int], int], target: int, *, name: str) -> int:
        """The number of word units to use: the most whose ``measure(n)`` (the tokens of what is built
        from the first ``n`` units) stays within ``target``, cut back to its last whole sentence where
        that still measures at least ``1 - LENGTH_TOLERANCE`` of ``target`` (a text of long sentences
        at a short length ends on a word instead)."""
        n = fit_count(measure, target, name=name)
        units = self.units(n)
        whole = next((b for b in range(n, 0, -1) if ends_sentence(units[b - 1])), 0)
        if 0 < whole < n and measure(whole) >= (1 - LENGTH_TOLERANCE) * target:
            return whole
        return n

    def token_weights(self, tokenizer, units: Sequence[str]) -> List[int]:
        """Tokens per unit (each distinct unit encoded once), used to place needles by token depth."""
        missing = [u for u in set(units) if u not in self._token_counts]
        for u in missing:
            self._token_counts[u] = max(1, len(tokenizer.encode(u.strip(), add_special_tokens=False)))
        return [self._token_counts[u] for u in units]


def insert_at_depths(
    units: List[str], weights: List[int], items: Sequence[Tuple[float, str]], joiner: str = " "
) -> Tuple[str, List[float]]:
    """Join ``units`` with each ``(depth, text)`` item put at the sentence boundary nearest to
    ``depth`` (0 = start, 1 = end) of the haystack's tokens; ``joiner`` separates items from the
    haystack around them (a space for needles, a newline for the passkey line).

    Returns the text and the depth each item actually landed at (token fraction before it).

    Example:
        >>> insert_at_depths(Haystack().units(8), [1] * 8, [(0.5, "X.")])
        ('The grass is green. X. The sky is blue.', [0.5])
    """
    n = len(units)
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    total = cum[-1]
    bounds = [i for i in range(n + 1) if i in (0, n) or ends_sentence(units[i - 1])]
    at: Dict[int, List[str]] = {}
    actual = []
    for depth, text in items:
        target = depth * total
        i = min(bounds, key=lambda b: (abs(cum[b] - target), b))
        at.setdefault(i, []).append(text)
        actual.append(cum[i] / total if total else 0.0)
    segments: List[str] = []
    chunk: List[str] = []
    for i in range(n + 1):
        if i in at:
            if "".join(chunk).strip():
                segments.append("".join(chunk).strip())
            chunk = []
            segments.extend(at[i])
        if i < n:
            chunk.append(units[i])
    if "".join(chunk).strip():
        segments.append("".join(chunk).strip())
    return joiner.join(segments), actual


def fit_count(measure: Callable[[int], int], target: int, *, name: str) -> int:
    """Largest ``n >= 0`` with ``measure(n) <= target``, for a ``measure`` that grows with ``n``
    (doubling, then bisection: about 2*log2(n) calls).

    Raises ``ValueError`` naming ``name`` when even ``n = 0`` exceeds ``target``."""
    cache: Dict[int, int] = {}

    def m(n: int) -> int:
        if n not in cache:
            cache[n] = measure(n)
        return cache[n]

    if m(0) > target:
        raise ValueError(f"{name}={target} is too short: the prompt without filler already takes {m(0)} tokens")
    lo, hi = 0, 1
    while m(hi) <= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if m(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def depth_grid(n: int, spacing: str = "linear") -> List[float]:
    """``n`` needle depths in [0, 1]: evenly spaced, or ``"sigmoid"``-spaced (denser near both ends,
    where retrieval usually changes fastest). ``n = 1`` gives the middle.

    Example:
        >>> depth_grid(5)
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"depths must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"depths must be >= 1, got {n}")
    if spacing not in ("linear", "sigmoid"):
        raise ValueError(f"depth spacing must be 'linear' or 'sigmoid', got {spacing!r}")
    if n == 1:
        return [0.5]
    xs = [i / (n - 1) for i in range(n)]
    if spacing == "sigmoid":
        f = [1.0 / (1.0 + math.exp(-6.0 * (x - 0.5))) for x in xs]
        xs = [(v - f[0]) / (f[-1] - f[0]) for v in f]
    return [round(x, 4) for x in xs]


def parse_size(text: str, *, name: str = "length") -> int:
    """``"4k"`` -> 4096, ``"1m"`` -> 1048576, ``"1000"`` -> 1000 (k = 1024, as in RULER's lengths)."""
    s = str(text).strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(s[-1:], 1)
    num = s[:-1] if mult > 1 else s
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"{name} must be a number like 512, 4k or 1m, got {text!r}") from None
    if not math.isfinite(value) or value * mult != int(value * mult):
        raise ValueError(f"{name} must be a whole number of tokens, got {text!r}")
    return int(value * mult)


def parse_sizes(text: str, *, name: str = "lengths", minimum: int = 1) -> List[int]:
    """Comma-separated sizes: ``"1k,4k,16k"`` -> ``[1024, 4096, 16384]``."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{name} must list at least one size, got {text!r}")
    sizes = [parse_size(p, name=name) for p in parts]
    for s in sizes:
        if s < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {s}")
    return sizes
