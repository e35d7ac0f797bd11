"""Prompt generators: needle in a haystack (RULER), passkey retrieval, retention.

Every generator is a pure function of its arguments: the same tokenizer, sizes, ``seed`` and
``index`` give the same prompt, byte for byte (the random state is seeded from a string of all of
them, which Python hashes the same way in every process).

A sample is split into ``context`` (what a model, or a memory, reads first) and ``query`` (the
question and answer prefix it continues from), so that a memory-augmented model can memorize the
context and then answer the query; ``prompt = context + query``.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .formats import (
    NEEDLE,
    NIAH_ANSWER_PREFIX,
    NIAH_INTRO,
    NIAH_QUESTION,
    PASSKEY_INTRO,
    PASSKEY_LINE,
    PASSKEY_QUESTION,
    join_keys,
    random_keys,
    random_values,
)
from .haystack import Haystack, check_tokenizer, insert_at_depths, prompt_tokens

# RULER's four needle tasks as (keys, values per key, queried keys).
NEEDLE_VARIANTS: Dict[str, tuple] = {
    "single": (1, 1, 1),
    "multikey": (4, 1, 1),
    "multivalue": (1, 4, 1),
    "multiquery": (4, 1, 4),
}
TYPE_V = "numbers"


@dataclass
class ProbeSample:
    """One prompt and what a right answer must contain.

    Attributes:
        probe: ``"needle"``, ``"passkey"`` or ``"retention"``.
        context: text read first (instructions, haystack, needles).
        query: the question and answer prefix; the model continues this text.
        expected: every string a right answer contains (scored by ``string_match_all``).
        needles: the inserted needle sentences, in the order they were made.
        params: the cell (requested sizes) and what was measured (``prompt_tokens``, actual depth).
    """

    probe: str
    context: str
    query: str
    expected: List[str]
    needles: List[str]
    params: Dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.context + self.query


def _rng(*parts) -> random.Random:
    return random.Random("|".join(str(p) for p in parts))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_depth(depth) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)):
        raise TypeError(f"depth must be a float in [0, 1], got {type(depth).__name__}")
    if not math.isfinite(depth) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a finite float in [0, 1], got {depth}")
    return float(depth)


def _check_haystack(haystack) -> Haystack:
    if haystack is None:
        return Haystack()
    if not isinstance(haystack, Haystack):
        raise TypeError(f"haystack must be a memlayers.probes.Haystack or None, got {type(haystack).__name__}")
    return haystack


def _fit_context(tokenizer, hay: Haystack, intro: str, items, query: str, context_length: int, joiner: str = " "):
    """``intro`` + as much of ``hay`` as keeps the prompt (with ``query``) within ``context_length``
    tokens, ``items`` (``(depth, text)``) inserted at their depths; returns the context and the
    depth each item actually landed at."""

    def build(n: int):
        units = hay.units(n)
        return insert_at_depths(units, hay.token_weights(tokenizer, units), items, joiner=joiner)

    n = hay.fit(lambda n: len(prompt_tokens(tokenizer, intro + build(n)[0], query)), context_length, name="context_length")
    text, actual = build(n)
    return intro + text, actual


def needle_sample(
    tokenizer,
    context_length: int,
    depth: float,
    *,
    variant: str = "single",
    seed: int = 0,
    index: int = 0,
    haystack: Optional[Haystack] = None,
) -> ProbeSample:
    """A RULER needle-in-a-haystack prompt of ``context_length`` tokens (at most, and within 2%).

    The first queried needle sits at ``depth`` (0 = start of the haystack, 1 = end); the other
    needles (distractor keys, extra values, extra queried keys) at seeded random depths.

    Args:
        tokenizer: a HuggingFace tokenizer (anything with ``encode(text, add_special_tokens=...)``).
        context_length: total prompt tokens (context with special tokens + query without).
        depth: float in [0, 1].
        variant: ``"single"``, ``"multikey"`` (4 keys, 1 asked), ``"multivalue"`` (1 key, 4 values)
            or ``"multiquery"`` (4 keys, all asked).
        seed, index: the random state; ``index`` numbers the samples of one cell.
        haystack: filler text; RULER's noise sentence by default.

    Example:
        >>> s = needle_sample(tok, 1024, 0.5)            # doctest: +SKIP
        >>> s.expected, s.params["prompt_tokens"]        # doctest: +SKIP
        (['4976413'], 1021)
    """
    check_tokenizer(tokenizer)
    _check_int("context_length", context_length, 1)
    depth = _check_depth(depth)
    if variant not in NEEDLE_VARIANTS:
        raise ValueError(f"variant must be one of {tuple(NEEDLE_VARIANTS)}, got {variant!r}")
    _check_int("seed", seed, 0)
    _check_int("index", index, 0)
    hay = _check_haystack(haystack)

    n_keys, n_values, n_queries = NEEDLE_VARIANTS[variant]
    rng = _rng("needle", variant, seed, context_length, depth, index)
    keys = random_keys(rng, n_keys)
    values = random_values(rng, n_keys * n_values)
    by_key = {k: values[i * n_values : (i + 1) * n_values] for i, k in enumerate(keys)}
    queried = rng.sample(keys, n_queries)
    needles = [NEEDLE.format(type_v=TYPE_V, key=k, value=v) for k in keys for v in by_key[k]]
    target = NEEDLE.format(type_v=TYPE_V, key=queried[0], value=by_key[queried[0]][0])
    items = [(depth, target)] + [(rng.random(), n) for n in needles if n != target]

    query_text = join_keys(queried)
    query = NIAH_QUESTION.format(type_v=TYPE_V, query=query_text) + NIAH_ANSWER_PREFIX.format(type_v=TYPE_V, query=query_text)
    context, actual = _fit_context(tokenizer, hay, NIAH_INTRO.format(type_v=TYPE_V), items, query, context_length)
    params = {
        "variant": variant,
        "context_length": context_length,
        "depth": depth,
        "needle_depth": round(actual[0], 4),
        "prompt_tokens": len(prompt_tokens(tokenizer, context, query)),
        "needle_tokens": [len(tokenizer.encode(x, add_special_tokens=False)) for x in needles],
    }
    expected = [v for k in queried for v in by_key[k]]
    return ProbeSample("needle", context, query, expected, needles, params)


def passkey_sample(
    tokenizer, context_length: int, depth: float, *, seed: int = 0, index: int = 0
) -> ProbeSample:
    """The passkey retrieval prompt (a key in 1..50000 hidden in the noise sentence at ``depth``),
    ``context_length`` tokens at most and within 2%.

    Example:
        >>> s = passkey_sample(tok, 2048, 0.25)          # doctest: +SKIP
        >>> s.query                                      # doctest: +SKIP
        '\\nWhat is the pass key? The pass key is'
    """
    check_tokenizer(tokenizer)
    _check_int("context_length", context_length, 1)
    depth = _check_depth(depth)
    _check_int("seed", seed, 0)
    _check_int("index", index, 0)

    rng = _rng("passkey", seed, context_length, depth, index)
    key = str(rng.randint(1, 50000))
    line = PASSKEY_LINE.format(key=key)
    query = PASSKEY_QUESTION
    context, actual = _fit_context(tokenizer, Haystack(), PASSKEY_INTRO, [(depth, line)], query, context_length, joiner="\n")
    params = {
        "context_length": context_length,
        "depth": depth,
        "needle_depth": round(actual[0], 4),
        "prompt_tokens": len(prompt_tokens(tokenizer, context, query)),
        "needle_tokens": [len(tokenizer.encode(line, add_special_tokens=False))],
    }
    return ProbeSample("passkey", context, query, [key], [line], params)


def retention_sample(
    tokenizer,
    distance: int,
    load: int,
    *,
    seed: int = 0,
    index: int = 0,
    haystack: Optional[Haystack] = None,
) -> ProbeSample:
    """Write a fact, then ``load`` further facts spread through ``distance`` intervening tokens,
    then ask for the first fact.

    Facts are RULER needles (``key -> 7-digit value``). ``distance`` counts every token between the
    asked fact and the question, the further facts included; when the ``load`` facts alone are
    longer, the distance is theirs (``params["distance_tokens"]`` says what was built).

    Example:
        >>> s = retention_sample(tok, 512, 8)            # doctest: +SKIP
        >>> len(s.needles), s.params["distance_tokens"]  # doctest: +SKIP
        (9, 510)
    """
    check_tokenizer(tokenizer)
    _check_int("distance", distance, 0)
    _check_int("load", load, 0)
    _check_int("seed", seed, 0)
    _check_int("index", index, 0)
    hay = _check_haystack(haystack)

    rng = _rng("retention", seed, distance, load, index)
    keys = random_keys(rng, load + 1)
    values = random_values(rng, load + 1)
    needles = [NEEDLE.format(type_v=TYPE_V, key=k, value=v) for k, v in zip(keys, values)]
    items = [((j + 1) / (load + 1), needles[j + 1]) for j in range(load)]

    def build(n: int) -> str:
        units = hay.units(n)
        return insert_at_depths(units, hay.token_weights(tokenizer, units), items)[0]

    def measure(n: int) -> int:
        return len(tokenizer.encode(build(n), add_special_tokens=False))

    n = hay.fit(measure, max(distance, measure(0)), name="distance")
    between = build(n)
    context = NIAH_INTRO.format(type_v=TYPE_V) + needles[0] + (" " + between if between else "")
    query = NIAH_QUESTION.format(type_v=TYPE_V, query=keys[0]) + NIAH_ANSWER_PREFIX.format(type_v=TYPE_V, query=keys[0])
    params = {
        "distance": distance,
        "load": load,
        "distance_tokens": measure(n),
        "prompt_tokens": len(prompt_tokens(tokenizer, context, query)),
        "needle_tokens": [len(tokenizer.encode(x, add_special_tokens=False)) for x in needles],
    }
    return ProbeSample("retention", context, query, [values[0]], needles, params)
