import pytest

from memlayers.probes import string_match_all, string_match_part


@pytest.mark.parametrize(
    "response, expected, score",
    [
        ("1234567", ["1234567"], 1.0),                                                      # exact
        (" The special magic number for calm-tiger is 1234567, as stated.", ["1234567"], 1.0),  # verbose
        ("I don't know.", ["1234567"], 0.0),                                                # wrong
        ("1234568", ["1234567"], 0.0),                                                      # one digit off
        ("are 1111111 and 3333333.", ["1111111", "2222222", "3333333", "4444444"], 0.5),    # partially right
        ("ABC-Def", ["abc-DEF"], 1.0),                                                      # case-insensitive
        ("\x00 7654321\x1f", ["7654321"], 1.0),                                             # control characters
    ],
)
def test_string_match_all(response, expected, score):
    assert string_match_all(response, expected) == pytest.approx(score)


def test_string_match_part_needs_only_one():
    assert string_match_part("are 1111111 only", ["1111111", "2222222"]) == 1.0
    assert string_match_part("nothing", ["1111111", "2222222"]) == 0.0
    assert string_match_all("are 1111111 only", ["1111111", "2222222"]) == 0.5


@pytest.mark.parametrize(
    "response, expected, exc, word",
    [
        (None, ["1"], TypeError, "response"),
        ("x", "1234", TypeError, "expected"),
        ("x", [], ValueError, "expected"),
        ("x", ["  "], ValueError, "expected"),
    ],
)
def test_bad_input(response, expected, exc, word):
    with pytest.raises(exc, match=word):
        string_match_all(response, expected)
