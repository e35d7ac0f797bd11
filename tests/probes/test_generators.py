import math

import pytest

from memlayers.probes import (
    NEEDLE_VARIANTS,
    Haystack,
    depth_grid,
    needle_sample,
    parse_sizes,
    passkey_sample,
    prompt_tokens,
    retention_sample,
)


@pytest.mark.parametrize("length", [256, 1000, 2048])
@pytest.mark.parametrize("variant", list(NEEDLE_VARIANTS))
def test_needle_length_within_2_percent(tokenizer, length, variant):
    s = needle_sample(tokenizer, length, 0.5, variant=variant, seed=3)
    n = len(prompt_tokens(tokenizer, s.context, s.query))
    assert n == s.params["prompt_tokens"]
    assert 0.98 * length <= n <= length


@pytest.mark.parametrize("length", [300, 1024])
def test_passkey_length_and_format(tokenizer, length):
    s = passkey_sample(tokenizer, length, 0.25, seed=1)
    n = len(prompt_tokens(tokenizer, s.context, s.query))
    assert 0.98 * length <= n <= length
    key = s.expected[0]
    assert 1 <= int(key) <= 50000
    assert f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" in s.context
    assert s.context.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert s.query == "\nWhat is the pass key? The pass key is"


def test_deterministic_given_seed(tokenizer):
    a = needle_sample(tokenizer, 512, 0.3, variant="multikey", seed=7, index=2)
    b = needle_sample(tokenizer, 512, 0.3, variant="multikey", seed=7, index=2)
    c = needle_sample(tokenizer, 512, 0.3, variant="multikey", seed=8, index=2)
    d = needle_sample(tokenizer, 512, 0.3, variant="multikey", seed=7, index=3)
    assert a.prompt == b.prompt and a.expected == b.expected
    assert c.prompt != a.prompt and d.prompt != a.prompt
    assert retention_sample(tokenizer, 200, 3, seed=1).prompt == retention_sample(tokenizer, 200, 3, seed=1).prompt
    assert passkey_sample(tokenizer, 400, 0.5, seed=2).prompt == passkey_sample(tokenizer, 400, 0.5, seed=2).prompt


def test_needle_format_and_variants(tokenizer):
    s = needle_sample(tokenizer, 512, 0.5)
    assert s.context.startswith("Some special magic numbers are hidden within the following text. Make sure to memorize it.")
    assert len(s.needles) == 1 and s.needles[0] in s.context
    assert s.needles[0].startswith("One of the special magic numbers for ") and s.needles[0].endswith(f"is: {s.expected[0]}.")
    assert s.query.endswith("mentioned in the provided text are")
    assert len(s.expected[0]) == 7

    mk = needle_sample(tokenizer, 512, 0.5, variant="multikey")
    assert len(mk.needles) == 4 and len(mk.expected) == 1 and all(n in mk.context for n in mk.needles)
    mv = needle_sample(tokenizer, 512, 0.5, variant="multivalue")
    assert len(mv.needles) == 4 and len(mv.expected) == 4
    assert len({n.split(" is: ")[0] for n in mv.needles}) == 1  # one key, four values
    mq = needle_sample(tokenizer, 512, 0.5, variant="multiquery")
    assert len(mq.expected) == 4 and mq.query.count(", and ") == 2  # in the question and the answer prefix


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_depth_is_placed_by_tokens(tokenizer, depth):
    s = needle_sample(tokenizer, 1024, depth)
    assert abs(s.params["needle_depth"] - depth) < 0.03
    # measured independently: tokens of the haystack before the needle over all haystack tokens
    intro_end = s.context.index("\n") + 1
    hay = s.context[intro_end:]
    before, after = hay.split(s.needles[0])
    nb = len(tokenizer.encode(before.strip(), add_special_tokens=False)) if before.strip() else 0
    na = len(tokenizer.encode(after.strip(), add_special_tokens=False)) if after.strip() else 0
    assert abs(nb / (nb + na) - depth) < 0.03


def test_needles_are_encoded_without_special_tokens(tokenizer):
    s = needle_sample(tokenizer, 512, 0.5)
    ids = tokenizer.encode(s.needles[0], add_special_tokens=False)
    assert tokenizer.bos_token_id not in ids
    assert s.params["needle_tokens"] == [len(ids)]
    # the prompt starts with BOS exactly once, the query part carries none
    full = prompt_tokens(tokenizer, s.context, s.query)
    assert full[0] == tokenizer.bos_token_id and full.count(tokenizer.bos_token_id) == 1


def test_file_haystack(tokenizer, tmp_path):
    f = tmp_path / "essay.txt"
    f.write_text("Paris is the capital of France. Rome is the capital of Italy!\nBerlin is in Germany? Yes. ")
    s = needle_sample(tokenizer, 400, 0.5, haystack=Haystack.from_file(f))
    assert "Rome is the capital of Italy!" in s.context and "grass" not in s.context
    assert 0.98 * 400 <= s.params["prompt_tokens"] <= 400


def test_retention_distance_and_load(tokenizer):
    s = retention_sample(tokenizer, 300, 4, seed=0)
    assert len(s.needles) == 5 and s.expected == [s.needles[0].split("is: ")[1].rstrip(".")]
    between = s.context.split(s.needles[0])[1]
    n_between = len(tokenizer.encode(between.strip(), add_special_tokens=False))
    assert abs(n_between - 300) <= 6 and s.params["distance_tokens"] == n_between
    assert all(n in between for n in s.needles[1:])
    key = s.needles[0].split(" for ")[1].split(" is:")[0]
    assert f"for {key} mentioned" in s.query
    zero = retention_sample(tokenizer, 0, 0)
    assert zero.context.endswith(zero.needles[0])


def test_depth_grid():
    assert depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    sig = depth_grid(7, "sigmoid")
    assert sig[0] == 0.0 and sig[-1] == 1.0 and sig == sorted(sig)
    gaps = [b - a for a, b in zip(sig, sig[1:])]
    assert gaps[0] < gaps[3]  # denser at the ends than in the middle
    assert parse_sizes("1k,4k,300") == [1024, 4096, 300]


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(context_length=0, depth=0.5), ValueError, "context_length"),
        (dict(context_length=1024.0, depth=0.5), TypeError, "context_length"),
        (dict(context_length=1024, depth=math.nan), ValueError, "depth"),
        (dict(context_length=1024, depth=1.5), ValueError, "depth"),
        (dict(context_length=1024, depth="0.5"), TypeError, "depth"),
        (dict(context_length=1024, depth=0.5, variant="many"), ValueError, "variant"),
        (dict(context_length=1024, depth=0.5, seed=-1), ValueError, "seed"),
        (dict(context_length=1024, depth=0.5, haystack="text"), TypeError, "haystack"),
        (dict(context_length=40, depth=0.5), ValueError, "context_length=40 is too short"),
    ],
)
def test_needle_bad_input(tokenizer, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        needle_sample(tokenizer, **kwargs)


def test_other_bad_input(tokenizer):
    with pytest.raises(TypeError, match="tokenizer"):
        needle_sample(object(), 512, 0.5)
    with pytest.raises(ValueError, match="distance"):
        retention_sample(tokenizer, -1, 0)
    with pytest.raises(ValueError, match="load"):
        retention_sample(tokenizer, 10, -2)
    with pytest.raises(ValueError, match="depths"):
        depth_grid(0)
    with pytest.raises(ValueError, match="lengths"):
        parse_sizes("1k,abc")
    with pytest.raises(ValueError, match="haystack file"):
        Haystack.from_file("/nonexistent/file.txt")
    with pytest.raises(ValueError, match="text"):
        Haystack("   ")


@pytest.mark.parametrize("length", [300, 1000, 2048])
def test_filler_ends_with_a_whole_sentence(tokenizer, length):
    # A fragment ("There and") before the last needle or the question is text the public formats never
    # show; at depth 1 the needle follows the filler's last sentence directly.
    p = passkey_sample(tokenizer, length, 1.0, seed=length)
    before = p.context.split("\n" + p.needles[0])[0]
    assert before.endswith(".") and p.context.endswith(p.needles[0])
    for depth in (0.0, 0.5):
        s = needle_sample(tokenizer, length, depth, seed=length)
        assert s.context.endswith("."), s.context[-40:]
        assert 0.98 * length <= s.params["prompt_tokens"] <= length
    r = retention_sample(tokenizer, length // 2, 2, seed=1)
    assert r.context.endswith(".")


def test_filler_of_long_sentences_ends_on_a_word(tokenizer, tmp_path):
    # No sentence ends within 2% of the length: the prompt keeps its length and ends mid-sentence.
    f = tmp_path / "run-on.txt"
    f.write_text(" ".join(["and the river kept on running past the town"] * 40) + ".")
    s = needle_sample(tokenizer, 300, 0.0, haystack=Haystack.from_file(f))
    assert 0.98 * 300 <= s.params["prompt_tokens"] <= 300
    assert not s.context.endswith(".")


def test_haystack_fit_cuts_back_to_the_last_sentence_within_tolerance():
    hay = Haystack("One two three. Four five six seven.")  # sentences end after units 3, 7, 10, 14, ...
    words = lambda n: n  # noqa: E731  (one token per unit)
    assert hay.fit(words, 100, name="x") == 98  # unit 100 is "two"; 98 ends "seven." and is 98% of 100
    assert hay.fit(words, 50, name="x") == 49
    assert hay.fit(words, 6, name="x") == 6  # the last sentence end (3) is too far below 6: ends on a word
    assert hay.fit(words, 7, name="x") == 7
