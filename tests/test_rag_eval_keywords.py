"""Keyword grading of answers (rag.eval.keyword_hits): formatting of the same fact is folded,
numbers are matched whole."""

import pytest

from rag.eval import keyword_hits


@pytest.mark.parametrize("answer,keyword", [
    ("fewer than 60% valid returns", "60 %"),
    ("the statement runs 1,000,000 times", "1000000"),
    ("keep it at 50–60 % SoC", "50-60 %"),
    ("replace the belts every 4000 h", "4,000"),
    ("error E-214", "e-214"),
    ("signal above \u221267 dBm", "-67 dBm"),
    ("compression level 9.", "9"),
    ("shred makes three overwrite passes by default", "3"),
    ("Twelve bytes", "12"),
])
def test_the_same_fact_written_differently_is_found(answer, keyword):
    assert keyword_hits(answer, [keyword]) == (True, 1.0)


@pytest.mark.parametrize("answer,keyword", [
    ("released in 1999", "9"),
    ("a cutoff of 0.65", "0.6"),
    ("up to 128 entries", "12"),
    ("60 percent", "60 %"),
    ("none of them, only one", "1"),  # 0 and 1 are not read from words
    ("threefold", "3"),
])
def test_a_number_inside_another_number_is_not_found(answer, keyword):
    assert keyword_hits(answer, [keyword]) == (False, 0.0)


def test_share_counts_each_keyword():
    assert keyword_hits("Z_BEST_COMPRESSION", ["Z_BEST_COMPRESSION", "9"]) == (False, 0.5)
    assert keyword_hits("anything", []) == (True, 1.0)
