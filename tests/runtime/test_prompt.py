"""Prompt layout against frames written out by hand, and the tokenizers' BOS/EOS wrapping."""
import pytest
import torch

from misotts.runtime.prompt import Segment, build_prompt
from misotts.runtime.tokenizer import ByteTokenizer, Llama3Tokenizer, load_tokenizer
from misotts.runtime.config import PRESETS

from ..tokenizer_files import write_templated_tokenizer

N = 4  # codebooks, small so the expected rows can be written out


def text_row(tok):
    return [0] * N + [tok], [False] * N + [True]


def audio_row(codes):
    return list(codes) + [0], [True] * N + [False]


def test_layout_matches_hand_written_rows():
    tok = ByteTokenizer(bos_id=256, eos_id=257)
    codes = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    frames, mask = build_prompt("b", 1, [Segment(0, "a", codes=codes)], tok, num_codebooks=N)
    # "[0]a" = bytes 91 48 93 97; "[1]b" = 91 49 93 98
    rows = [text_row(t) for t in (256, 91, 48, 93, 97, 257)]
    rows += [audio_row([5, 6, 7, 8]), audio_row([9, 10, 11, 12]), audio_row([0, 0, 0, 0])]
    rows += [text_row(t) for t in (256, 91, 49, 93, 98, 257)]
    assert frames.tolist() == [r[0] for r in rows]
    assert mask.tolist() == [r[1] for r in rows]


def test_segment_audio_goes_through_the_encoder():
    wav = torch.randn(10)
    seen = []

    def encode(audio):
        seen.append(audio)
        return torch.full((3, N), 7)

    frames, _ = build_prompt("x", 0, [Segment(1, "y"), Segment(2, "z", audio=wav)], ByteTokenizer(),
                             num_codebooks=N, encode_audio=encode)
    assert len(seen) == 1 and seen[0] is wav
    # "[1]y" text only (6 rows), "[2]z" (6) + 3 audio + end row, target "[0]x" (6)
    assert frames.shape[0] == 6 + 6 + 4 + 6


def test_audio_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        build_prompt("x", 0, [Segment(0, "y", audio=str(tmp_path / "missing.wav"))], ByteTokenizer(),
                     num_codebooks=N, encode_audio=lambda a: torch.zeros(1, N, dtype=torch.long))


def test_encoded_audio_becomes_rows_plus_end_row():
    frames, mask = build_prompt("x", 0, [Segment(1, "y", audio=torch.zeros(10))], ByteTokenizer(),
                                num_codebooks=N, encode_audio=lambda a: torch.full((3, N), 7))
    audio_part = frames[6:10]  # 6 text rows for "[1]y"
    assert audio_part[:3, :N].eq(7).all() and audio_part[3].eq(0).all()
    assert mask[6:10, :N].all() and not mask[6:10, N].any()


@pytest.mark.parametrize("codes, match", [
    (torch.zeros(3, N + 1, dtype=torch.long), "must be"),
    (torch.zeros(3, N), "integers"),
    (torch.full((3, N), 2048), "0..2047"),
    (torch.full((3, N), -1), "0..2047"),
])
def test_bad_codes_rejected(codes, match):
    with pytest.raises(ValueError, match=match):
        build_prompt("x", 0, [Segment(0, "y", codes=codes)], ByteTokenizer(), num_codebooks=N)


def test_audio_and_codes_together_rejected():
    with pytest.raises(ValueError, match="not both"):
        build_prompt("x", 0, [Segment(0, "y", audio=torch.zeros(5), codes=torch.zeros(1, N, dtype=torch.long))],
                     ByteTokenizer(), num_codebooks=N, encode_audio=lambda a: None)


def test_context_items_must_be_segments():
    with pytest.raises(TypeError, match="Segment"):
        build_prompt("x", 0, [("0", "y")], ByteTokenizer(), num_codebooks=N)


def _write_word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[0]hello": 5, "world": 6, "<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def test_llama3_tokenizer_wraps_in_bos_eos(tmp_path):
    _write_word_level_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(PRESETS["csm-1b"], tmp_path)
    assert isinstance(tok, Llama3Tokenizer)
    assert tok.encode("[0]hello world") == [128000, 5, 6, 128001]


def test_llama3_tokenizer_takes_bos_eos_from_its_file(tmp_path):
    # Not the config's 128000/128001: the ids the tokenizer.json itself wraps a text in.
    write_templated_tokenizer(tmp_path / "tokenizer.json", bos=7, eos=9)
    tok = load_tokenizer(PRESETS["csm-1b"], tmp_path)
    assert (tok.bos_id, tok.eos_id) == (7, 9)
    frames, mask = build_prompt("hello world", 0, [], tok, num_codebooks=N)
    assert frames[:, N].tolist() == [7, 1, 2, 9] and mask[:, N].all()
    llama = write_templated_tokenizer(tmp_path / "llama.json", bos=11, eos=12,
                                      names=("<|begin_of_text|>", "<|end_of_text|>"), bos_only_template=True)
    assert Llama3Tokenizer(llama).encode("[0]hello world") == [11, 1, 2, 12]


def test_text_ids_outside_the_model_vocabulary_are_refused():
    tok = ByteTokenizer(bos_id=300, eos_id=257)
    with pytest.raises(ValueError, match="text id 300 .* 258"):
        build_prompt("x", 0, [], tok, num_codebooks=N, text_vocab_size=258)
    with pytest.raises(ValueError, match="text id 300 .* 258"):  # in a context turn too, before its audio
        build_prompt("x", 0, [Segment(1, "y", audio=torch.zeros(5))], tok, num_codebooks=N,
                     encode_audio=lambda a: pytest.fail("audio encoded before the text was checked"),
                     text_vocab_size=258)
    frames, _ = build_prompt("x", 0, [], ByteTokenizer(), num_codebooks=N, text_vocab_size=258)
    assert frames[:, N].max() == 257


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(PRESETS["csm-1b"], tmp_path)
