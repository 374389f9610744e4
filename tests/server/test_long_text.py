"""Sentence splitting and turn packing (no model)."""
from misotts.server.long_text import fit_history, sentences, split_complete, split_turns


def count(text: str) -> int:
    return len(text.encode())


def test_sentences_end_at_punctuation_followed_by_space():
    assert sentences('One. "Two!" Three? Four\u3002 Five') == ["One.", '"Two!"', "Three?", "Four\u3002", "Five"]
    assert sentences("3.14 is pi.") == ["3.14 is pi."]
    assert sentences("\u4f60\u597d\u3002\u518d\u89c1\uff01") == ["\u4f60\u597d\u3002", "\u518d\u89c1\uff01"]


def test_turns_pack_whole_sentences_and_cut_only_what_cannot_fit():
    text = "Aa bb. Cc dd. " + "word " * 10 + "x" * 25
    turns = split_turns(text, 12, count)
    assert all(count(t) <= 12 for t in turns)
    assert turns[:2] == ["Aa bb.", "Cc dd."]  # two sentences of 6 would make 13 with the space
    assert " ".join(turns).split() == text.replace("x" * 25, "x" * 12 + " " + "x" * 12 + " x").split()
    assert split_turns("Short. Also short.", 100, count) == ["Short. Also short."]


def test_streamed_text_keeps_the_unfinished_sentence():
    assert split_complete("One. Two. Thr") == (["One.", "Two."], "Thr")
    assert split_complete("One. Two.") == (["One."], "Two.")  # "Two." may go on ("Two.5")
    assert split_complete("no end yet") == ([], "no end yet")


def test_the_history_keeps_the_newest_turns_that_fit():
    assert fit_history([5, 4, 3], lambda n: n, 7) == [4, 3]
    assert fit_history([5, 4, 3], lambda n: n, 2) == []
