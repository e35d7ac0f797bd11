"""The public prompt formats the probes reproduce, word for word.

Changing any string here changes every score: the wording is what makes our numbers comparable with
RULER's needle-in-a-haystack tasks and with the passkey retrieval test.
"""
from __future__ import annotations

import random
from typing import List

# RULER's "noise" haystack, also the passkey test's filler.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# RULER's needle and niah template; {type_v} is "numbers" for numeric values.
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_INTRO = (
    "Some special magic {type_v} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {type_v} afterwards.\n"
)
NIAH_QUESTION = "\nWhat are all the special magic {type_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"

# The passkey retrieval test (Mohtashami & Jaggi, "Landmark Attention"), lines joined by newlines.
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there.\n"
)
PASSKEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

# Keys are "adjective-noun" pairs, like RULER's word keys (our own short lists).
_ADJECTIVES = (
    "amber ancient brave bright calm clever cold crimson curious damp dusty eager early faint fancy "
    "fierce gentle giant golden hidden hollow humble icy jolly kind lazy little lively lonely loud "
    "lucky mellow misty narrow noble odd pale proud quiet rapid rough rustic shiny silent silver "
    "sleepy smooth solid sour spicy steady sturdy sunny swift tall tender tidy tiny vivid wandering "
    "warm wise witty young zesty"
).split()
_NOUNS = (
    "anchor apple arrow badge basket beacon bell blanket boat bottle bridge bucket button cabin "
    "candle canyon castle cedar chair cliff cloud comet compass cottage crayon crystal desk dragon "
    "drum engine falcon feather fence fiddle forest fountain garden glacier guitar hammer harbor "
    "helmet island jacket kettle ladder lantern lemon magnet meadow mirror mountain needle orchard "
    "otter paddle parrot pebble pepper piano pillow planet pocket quilt rabbit river rocket saddle "
    "satchel shovel spoon statue tiger tower trumpet tunnel valley violin wagon whistle window"
).split()


def random_keys(rng: random.Random, n: int) -> List[str]:
    """``n`` distinct "adjective-noun" keys drawn with ``rng``."""
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), n)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def random_values(rng: random.Random, n: int, digits: int = 7) -> List[str]:
    """``n`` distinct ``digits``-digit numbers (RULER's numeric values), as strings."""
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def join_keys(keys: List[str]) -> str:
    """RULER's query wording: "a" for one key, "a, b, and c" for several."""
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + ", and " + keys[-1]
