from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llm_mitm.literals import Literals

_PATTERNS = st.lists(st.binary(min_size=0, max_size=4), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_PATTERNS, st.binary(max_size=40))
def test_any_found_is_any_in(patterns: list[bytes], text: bytes) -> None:
    """One pass answers what a search for each would: overlapping patterns, one inside
    another, repeated, empty (which names nothing) or none at all."""
    literals = Literals(patterns)
    assert literals.found_in(text) == any(pattern in text for pattern in patterns if pattern)


def test_ends_of_matches_tell_what_follows() -> None:
    tokens = Literals([b"token"])
    text = b"max_tokens, a token, tokentoken"
    assert [text[end : end + 1] for end in tokens.ends_in(text)] == [b"s", b",", b"t", b""]
    assert Literals([]).ends_in(text) == [] and not Literals([b""]).found_in(text)
