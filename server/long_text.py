"""Long input: split at sentence boundaries into turns that each fit the context window, and
keep only as much of the history as fits beside the next turn."""
from __future__ import annotations

import re

# A sentence ends at . ! ? with whitespace after it (a closing quote or bracket may come between:
# it stays with its sentence); the CJK full stops need no space.  "3.14" stays whole; "Dr. Smith"
# splits after "Dr.": abbreviations are not known.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+|(?<=[\u3002\uff01\uff1f])\s*")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def split_complete(text: str) -> tuple[list[str], str]:
    """Text arriving in pieces -> (the sentences already complete, the unfinished rest).  A
    sentence is complete once whitespace follows its end: "Dr." or "3." may still go on."""
    end = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
    return sentences(text[:end]), text[end:]


def split_turns(text: str, max_tokens: int, count_tokens) -> list[str]:
    """Whole sentences packed into turns of at most max_tokens tokens each (count_tokens(text) ->
    int); a single sentence longer than that is cut at spaces, and a word longer still is cut."""
    turns: list[str] = []
    current = ""
    for piece in _pieces(text, max_tokens, count_tokens):
        joined = f"{current} {piece}" if current else piece
        if current and count_tokens(joined) > max_tokens:
            turns.append(current)
            joined = piece
        current = joined
    if current:
        turns.append(current)
    return turns


def _pieces(text: str, max_tokens: int, count_tokens):
    for sentence in sentences(text):
        if count_tokens(sentence) <= max_tokens:
            yield sentence
            continue
        part = ""
        for word in sentence.split():
            while count_tokens(word) > max_tokens:  # no space to cut at: cut the word
                cut = max(1, len(word) * max_tokens // count_tokens(word))
                if part:
                    yield part
                    part = ""
                yield word[:cut]
                word = word[cut:]
            joined = f"{part} {word}" if part else word
            if part and count_tokens(joined) > max_tokens:
                yield part
                joined = word
            part = joined
        if part:
            yield part


def fit_history(history: list, positions_of, room: int) -> list:
    """The newest turns of `history` whose positions (positions_of(segment)) fit in `room`:
    older turns fall out first, as a sliding window over the conversation."""
    kept, used = [], 0
    for segment in reversed(history):
        used += positions_of(segment)
        if used > room:
            break
        kept.append(segment)
    return kept[::-1]
