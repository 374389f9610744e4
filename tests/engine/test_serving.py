"""TTS on the engine: audio streams, concurrent streams, conversations that reuse KV."""
import asyncio
import threading

import pytest
import torch

from misotts.api import TTS, Audio
from misotts.runtime.generate import generate_codes
from misotts.runtime.tokenizer import ByteTokenizer

from .conftest import TINY, make_model, random_codes

FRAME = 1920


@pytest.fixture(scope="module")
def tts():
    tts = TTS(make_model(), ByteTokenizer(TINY.bos_id, TINY.eos_id), untrained=True)
    tts.start_engine({"max_batch": 4})
    yield tts
    tts.engine.close()


def test_stream_chunks_concatenate_to_generate(tts):
    kw = dict(max_audio_ms=400, seed=1)  # 5 frames
    stream = tts.stream("Streaming test.", first_chunk_frames=1, chunk_frames=2, **kw)
    chunks = list(stream)
    assert [len(c.codes) for c in chunks] == [1, 2, 2]
    assert chunks[0].samples.numel() == FRAME and stream.stats.first_audio_s > 0 and stream.stats.frames == 5
    whole = tts.generate("Streaming test.", **kw)
    assert torch.equal(torch.cat([c.codes for c in chunks]), whole.codes)
    assert torch.equal(torch.cat([c.samples for c in chunks]), whole.samples)
    frames, mask = tts.prompt("Streaming test.")
    assert torch.equal(whole.codes, generate_codes(tts.model, frames, mask, 5, seed=1))
    assert tts.engine.wait_idle() and tts.engine.pool.all_free()


def test_concurrent_audio_streams_equal_solo(tts):
    texts = ["First voice.", "Second voice, other seed."]
    solo = [tts.generate(t, max_audio_ms=240, seed=i) for i, t in enumerate(texts)]
    results = [None, None]

    def run(i):
        results[i] = Audio.concat(list(tts.stream(texts[i], max_audio_ms=240, seed=i)), TINY.num_codebooks)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, solo):
        assert torch.equal(got.codes, want.codes)
        # Mimi in another thread can round differently (seen: 7e-8); the codes are what must match.
        torch.testing.assert_close(got.samples, want.samples, rtol=0, atol=1e-6)

    async def both():
        async def one(i):
            return torch.cat([c.samples async for c in tts.astream(texts[i], max_audio_ms=240, seed=i)])
        return await asyncio.gather(one(0), one(1))

    for got, want in zip(asyncio.run(both()), solo):
        torch.testing.assert_close(got, want.samples, rtol=0, atol=1e-6)


def test_conversation_reuses_history_and_matches_cold_runs(tts):
    chat = tts.conversation()
    chat.add(1, "Hello, who is there?", codes=random_codes(5))  # a turn that was spoken, not generated
    computed = []
    for turn in range(4):
        text = f"Turn {turn}."
        context = list(chat.history)
        codes = chat.say_codes(text, speaker=turn % 2, max_audio_ms=480, seed=turn)
        frames, mask = tts.prompt(text, turn % 2, context)
        assert torch.equal(codes, generate_codes(tts.model, frames, mask, 6, seed=turn)), f"turn {turn}"
        stats = chat.last_stats
        computed.append(stats.computed_positions)
        if turn:
            assert stats.reused_positions > 0
        assert len(chat.history) == turn + 2
    # New work per turn: the new text, the end-of-audio row and the unfed last frame, plus under
    # one block of already seen rows -- the same whatever the history's length.
    text_rows = len(tts.tokenizer.encode("[0]Turn 0."))
    assert max(computed[1:]) <= text_rows + 2 + tts.engine.pool.block_size
    audio = chat.say("And the last turn, with audio.", speaker=1, max_audio_ms=160, seed=9)
    assert audio.samples.numel() == 2 * FRAME and torch.equal(chat.history[-1].codes, audio.codes)


def test_text_ids_outside_the_vocabulary_are_refused(tts, monkeypatch):
    monkeypatch.setattr(tts, "tokenizer", ByteTokenizer(300, TINY.eos_id))  # a BOS the model has no row for
    with pytest.raises(ValueError, match=f"text id 300 .* {TINY.text_vocab_size}"):
        tts.generate("Hello.", max_audio_ms=160)
    assert tts.engine.wait_idle() and tts.engine.pool.all_free()


def test_load_backends_and_tts_conversation():
    import misotts

    reference = misotts.load("tiny", device="cpu", backend="reference")
    served = misotts.load("tiny", device="cpu", backend="auto", engine={"max_batch": 2})
    ref_engine = reference.engine  # backend="reference": the reference engine configuration
    assert (ref_engine.max_batch, ref_engine.runner.ops.name, ref_engine.graphs.graphs) == (1, "torch", {})
    assert served.engine.max_batch == 2
    assert served.engine.audio is not None  # the lanes' Mimi decoder is made at load, not by the first request
    kw = dict(max_audio_ms=240, seed=1)
    assert torch.equal(served.generate_codes("Same words.", **kw), reference.generate_codes("Same words.", **kw))
    chat = served.conversation()
    chat.say_codes("A first turn, long enough to fill a few KV blocks.", speaker=0, **kw)
    chat.say_codes("A reply.", speaker=1, **kw)
    assert chat.last_stats.reused_positions >= 48
    with pytest.raises(ValueError, match="backend"):
        misotts.load("tiny", device="cpu", backend="fast")
    served.engine.close()
