"""The quality tools for quantised weights, on `tiny`: the WER command end to end with a stand-in
ASR (the real one is any local transformers model), and the accuracy script's teacher forcing."""
import json

import pytest
import torch

from misotts.bench import quality
from misotts.bench.quant_accuracy import compare, teacher_forced_logits
from misotts.runtime.config import PRESETS
from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import random_model

SENTENCES = ["The cat sat on the mat.", "Hello there, how are you today?"]

FAKE_ASR = '''
CALLS = []

def transcribe(samples, sample_rate):
    """The unquantised model's clips come back word for word; later ones lose their last word."""
    CALLS.append((samples, sample_rate))
    sentences = {sentences!r}
    text = sentences[(len(CALLS) - 1) % len(sentences)]
    return text if len(CALLS) <= len(sentences) else " ".join(text.split()[:-1])
'''


def test_quality_command_on_tiny_with_a_stand_in_asr(tmp_path, monkeypatch, capsys, one_thread):
    (tmp_path / "fake_asr_mod.py").write_text(FAKE_ASR.format(sentences=SENTENCES))
    (tmp_path / "sentences.txt").write_text("\n".join(SENTENCES) + "\n\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "quality.json"
    argv = ["--model", "tiny", "--asr", "fake_asr_mod:transcribe", "--weights", "int8", "--sentences",
            str(tmp_path / "sentences.txt"), "--max-audio-ms", "160", "--device", "cpu", "--out", str(out),
            "--keep-audio", str(tmp_path / "clips")]
    assert quality.main(argv) == 0
    import fake_asr_mod

    # Two sentences x (unquantised, int8), each 2 frames of 24 kHz audio handed to the ASR.
    assert [(len(s), rate) for s, rate in fake_asr_mod.CALLS] == [(2 * 1920, 24_000)] * 4
    assert fake_asr_mod.CALLS[0][0].dtype.name == "float32"
    results = json.loads(out.read_text())["results"]
    assert results["unquantised"]["wer"] == 0
    # int8's transcripts drop one word of each sentence: 2 deletions in 6 + 6 reference words.
    assert results["int8"]["wer"] == pytest.approx(2 / 12)
    table = capsys.readouterr().out
    assert "| unquantised | 0.0% | +0.0% |" in table and "| int8 | 16.7% | +16.7% |" in table
    assert len(list((tmp_path / "clips").glob("int8-*.wav"))) == 2


def test_quality_command_refuses_bad_arguments(capsys):
    assert quality.main(["--model", "tiny", "--asr", "x:y", "--weights", "int9"]) == 2
    assert "unknown weights 'int9'" in capsys.readouterr().err
    assert quality.main(["--model", "tiny", "--asr", "no_such_module_here:f"]) == 2


def test_word_error_rate_normalises_case_and_punctuation():
    assert quality.word_error_rate(["Hello, World!"], ["hello world"]) == 0
    assert quality.word_error_rate(["a b c d"], ["a x c"]) == pytest.approx(2 / 4)  # one substitution, one deletion
    assert quality.word_error_rate(["a b"], [""]) == 1.0


def test_teacher_forced_logits_give_the_greedy_codes_the_model_generates(one_thread):
    config = PRESETS["tiny"]
    model = random_model(config, seed=2)
    frames, mask = build_prompt("teacher forcing", 0, [], ByteTokenizer(config.bos_id, config.eos_id))
    codes = generate_codes(model, frames, mask, 5, temperature=0, topk=1, stop_on_eos=False)
    logits = teacher_forced_logits(model, frames, mask, codes)
    assert logits.shape == (5, 32, config.audio_vocab_size)
    assert torch.equal(logits.argmax(-1), codes)
    assert compare(logits, logits) == {"first_frame": 0.0, "first_3": 0.0, "worst": 0.0, "agreement": 1.0}
    shifted = logits.clone()
    # One logit of frame 1, codebook 3 raised past the top: that code flips, nothing else moves.
    low = logits[1, 3].argmin()
    shifted[1, 3, low] = logits[1, 3].max() + logits[1].abs().max() * 0.5
    r = compare(shifted, logits)
    assert r["first_frame"] == 0 and r["agreement"] == pytest.approx(1 - 1 / (5 * 32))
    err = (shifted[1, 3, low] - logits[1, 3, low]).abs() / logits[1].abs().max()
    assert r["first_3"] == r["worst"] == pytest.approx(err.item(), rel=1e-6)


def test_a_local_transformers_asr_model_loads_and_transcribes_24khz_audio(tmp_path, one_thread):
    """The real loading path (--asr FOLDER) on a tiny random wav2vec2 CTC model saved here: what
    it returns is what the model itself decodes from the audio resampled to its 16 kHz."""
    import numpy as np
    import soxr
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC,
                              Wav2Vec2Processor)

    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "|": 1, "<unk>": 2, "a": 3, "b": 4, "c": 5}))
    tokenizer = Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                                        return_attention_mask=False)
    processor = Wav2Vec2Processor(feature_extractor=features, tokenizer=tokenizer)
    processor.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(Wav2Vec2Config(
        vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2, pad_token_id=0)).eval()
    model.save_pretrained(tmp_path)

    samples = (np.random.default_rng(0).standard_normal(24_000) * 0.1).astype(np.float32)
    got = quality.load_asr(str(tmp_path), "cpu")(samples, 24_000)
    inputs = processor(soxr.resample(samples, 24_000, 16_000), sampling_rate=16_000, return_tensors="pt")
    with torch.no_grad():
        ids = model(inputs.input_values).logits.argmax(-1)
    assert got == processor.batch_decode(ids)[0] and got
