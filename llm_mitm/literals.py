"""Many literal strings looked for in one pass over a text.

Each `in` or `str.find` is a pass of its own, and a regex of literal alternatives tries
every position of the text; an Aho-Corasick automaton (ahocorasick-rs, in Rust, with a SIMD
prefilter when matching leftmost-first) reads the text once for all of them: 2.4 µs on 15 KB
of prose against ~300 µs for the twenty passes that redaction's first look made.
"""

from __future__ import annotations

from collections.abc import Iterable

from ahocorasick_rs import MATCHKIND_LEFTMOST_FIRST, BytesAhoCorasick


class Literals:
    """Which of some byte strings (UTF-8, for text) are in a text: only whether any is, or
    where each found ends. Matches do not overlap: one inside another found first is not
    reported, so ask whether any is there, not which."""

    __slots__ = ("_automaton",)

    def __init__(self, patterns: Iterable[bytes]) -> None:
        found = sorted({pattern for pattern in patterns if pattern})
        self._automaton = BytesAhoCorasick(found, matchkind=MATCHKIND_LEFTMOST_FIRST) if found else None

    def found_in(self, data: bytes) -> bool:
        return self._automaton is not None and bool(self._automaton.find_matches_as_indexes(data))

    def ends_in(self, data: bytes) -> list[int]:
        """Where each match ends (a byte after it may tell whether it counts): every
        occurrence only of a pattern that cannot overlap another or itself (`token`)."""
        return [end for _, _, end in self._automaton.find_matches_as_indexes(data)] if self._automaton is not None else []
