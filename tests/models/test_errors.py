from models.errors import quoted


def test_quoted_keeps_short_text_whole_and_cuts_long_text_to_its_start_and_length() -> None:
    assert quoted("cat") == "'cat'"
    assert quoted("x" * 60) == repr("x" * 60)
    assert quoted("x" * 6000) == f"{'x' * 60!r}... (6000 characters)"
    assert quoted("abcdef", limit=3) == "'abc'... (6 characters)"
