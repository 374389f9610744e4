"""Long input: split at sentence boundaries into turns that each fit the context window, and
keep only as much of the history as fits beside the next turn."""
from __future__ import annotations

from sentencex import segment

# Sentence ends come from sentencex (Wikimedia's rule-based segmenter: abbreviations such as "Dr."
# or "e.g.", decimals, quotes, the CJK full stops).  Chosen over pysbd, with the same score on
# tests/server/test_long_text.py's cases and 20x faster, maintained, no dependencies; our old regex
# split "Dr. Smith" (docs/server.md).  Its English rules serve every input: the CJK marks split
# whatever the language.
LANGUAGE = "en"


def sentences(text: str) -> list[str]:
    return [s.strip() for s in segment(LANGUAGE, text.strip()) if s.strip()]


def split_complete(text: str) -> tuple[list[str], str]:
    """Text arriving in pieces -> (the sentences already complete, the unfinished rest).  A
    sentence is complete once text follows it, or whitespace after an end that sentencex would
    split from a next word ("Hello. " is, "Dr. " and "3 p.m. " are not); "3." may still go on."""
    if text[-1:].isspace():
        probe = list(segment(LANGUAGE, text + _PROBE))
        if probe[-1] == _PROBE:  # the probe began a sentence of its own: all before it is complete
            return sentences(text), ""
    pieces = list(segment(LANGUAGE, text))  # they join back to the text, whitespace and all
    last = max((i for i, p in enumerate(pieces) if p.strip()), default=None)
    if last is None:
        return [], text
    return sentences("".join(pieces[:last])), "".join(pieces[last:])


_PROBE = "X"  # a capitalised word that is no sentence starter by itself ("The" would split "Dr. The")


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
