"""Sentence splitting and turn packing (no model)."""
from misotts.server.long_text import fit_history, sentences, split_complete, split_turns


def count(text: str) -> int:
    return len(text.encode())


def test_sentences_end_at_punctuation_followed_by_space():
    assert sentences('One. "Two!" Three? Four\u3002 Five') == ["One.", '"Two!"', "Three?", "Four\u3002", "Five"]
    assert sentences("3.14 is pi.") == ["3.14 is pi."]
    assert sentences("\u4f60\u597d\u3002\u518d\u89c1\uff01") == ["\u4f60\u597d\u3002", "\u518d\u89c1\uff01"]


# Abbreviations, numbers, quotes and CJK: the set sentencex and pysbd both split right (22 of 22),
# nupunkt 20 and our old regex 9 (docs/server.md).
CASES = [
    ("Dr. Smith went to Washington. He arrived at 3 p.m. on Monday.",
     ["Dr. Smith went to Washington.", "He arrived at 3 p.m. on Monday."]),
    ("The value of pi is 3.14. It is irrational.", ["The value of pi is 3.14.", "It is irrational."]),
    ('She said, "Stop!" Then she left.', ['She said, "Stop!"', "Then she left."]),
    ("Mr. and Mrs. Jones met Prof. Lee. They talked.", ["Mr. and Mrs. Jones met Prof. Lee.", "They talked."]),
    ("It costs $5.50, e.g. for a coffee. Fine.", ["It costs $5.50, e.g. for a coffee.", "Fine."]),
    ("See Fig. 3 for details. The results are clear.", ["See Fig. 3 for details.", "The results are clear."]),
    ("He was born on Jan. 5, 1990. She was not.", ["He was born on Jan. 5, 1990.", "She was not."]),
    ("Version 2.0 ships today! Are you ready?", ["Version 2.0 ships today!", "Are you ready?"]),
    ("St. Louis is big. So is Mt. Everest.", ["St. Louis is big.", "So is Mt. Everest."]),
    ("\u4f60\u597d\u3002\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01\u6211\u4eec\u53bb\u516c\u56ed\u5427\uff1f",
     ["\u4f60\u597d\u3002", "\u4eca\u5929\u5929\u6c14\u5f88\u597d\uff01", "\u6211\u4eec\u53bb\u516c\u56ed\u5427\uff1f"]),
    ("\u3053\u3093\u306b\u3061\u306f\u3002\u5143\u6c17\u3067\u3059\u304b\uff1f",
     ["\u3053\u3093\u306b\u3061\u306f\u3002", "\u5143\u6c17\u3067\u3059\u304b\uff1f"]),
    ("'Really?' she asked. 'Yes.'", ["'Really?' she asked.", "'Yes.'"]),
    ("The U.S. economy grew. Analysts were surprised.", ["The U.S. economy grew.", "Analysts were surprised."]),
    ("Call me at 555.1234 tomorrow. Thanks.", ["Call me at 555.1234 tomorrow.", "Thanks."]),
    ("Wait... what? No way!", ["Wait... what?", "No way!"]),
    ("I moved to the U.S. in 2019. It was cold.", ["I moved to the U.S. in 2019.", "It was cold."]),
    ("Ms. Park works at Acme Inc. in Seoul. She likes it.", ["Ms. Park works at Acme Inc. in Seoul.", "She likes it."]),
    ("The meeting is at 10 a.m. tomorrow. Don't be late.", ["The meeting is at 10 a.m. tomorrow.", "Don't be late."]),
    ("It's 5 vs. 3 now. We lead.", ["It's 5 vs. 3 now.", "We lead."]),
    ("\u201cHello,\u201d he said. \u201cGoodbye.\u201d", ["\u201cHello,\u201d he said.", "\u201cGoodbye.\u201d"]),
    ("Read chapter 4.2 first. Then 4.3.", ["Read chapter 4.2 first.", "Then 4.3."]),
    ("Hallo. Wie geht's? Gut!", ["Hallo.", "Wie geht's?", "Gut!"]),
]


def test_abbreviations_numbers_quotes_and_cjk_split_right():
    wrong = [(text, sentences(text)) for text, want in CASES if sentences(text) != want]
    assert wrong == []


def test_streamed_text_waits_for_what_follows_an_abbreviation():
    assert split_complete("Dr. ") == ([], "Dr. ")
    assert split_complete("Hello Dr. ") == ([], "Hello Dr. ")
    assert split_complete("Dr. Smith is here. He") == (["Dr. Smith is here."], "He")
    assert split_complete("We met at 3 p.m. on") == ([], "We met at 3 p.m. on")
    # whitespace after an end no abbreviation explains completes the sentence at once
    assert split_complete("Dr. Smith is here. ") == (["Dr. Smith is here."], "")
    done, rest = split_complete("One.  Two.\n\nThree")
    assert done == ["One.", "Two."] and rest == "Three"


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
