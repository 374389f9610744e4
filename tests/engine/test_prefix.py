"""Prefix reuse: a turn whose prompt starts with cached rows skips them and still gets cold-run codes."""
import torch

from misotts.engine import Engine, EngineConfig
from misotts.runtime.generate import generate_codes
from misotts.runtime.prompt import Segment

from .conftest import history, prompt, submit

BS = 16
GEN = dict(temperature=0.9, topk=50, stop_on_eos=False)


def test_second_turn_reuses_first_turn_and_matches_cold_run(tiny_model):
    engine = Engine(tiny_model, EngineConfig(max_batch=2, block_size=BS))
    context = history(2)
    first_prompt = prompt("What do you think?", 0, context)
    first = submit(engine, *first_prompt, 10, seed=1, **GEN)
    codes = first.codes()
    assert first.stats.reused_positions == 0
    assert first.stats.computed_positions == len(first_prompt[0])

    frames, mask = prompt("I think it is fine.", 1, context + [Segment(0, "What do you think?", codes=codes)])
    second = submit(engine, frames, mask, 8, seed=2, **GEN)
    warm = second.codes()
    # Cached: the first prompt and 9 of its 10 frames (the last was never fed back), in full blocks.
    cached = (len(first_prompt[0]) + 9) // BS * BS
    assert second.stats.reused_positions == cached
    assert second.stats.computed_positions == len(frames) - cached
    assert engine.stats()["reused_positions"] == cached

    cold = generate_codes(tiny_model, frames, mask, 8, seed=2, **GEN)
    assert torch.equal(warm, cold)
    assert engine.wait_idle() and engine.pool.all_free()
    engine.close()


def test_identical_prompt_reuses_all_but_the_last_row(tiny_model):
    engine = Engine(tiny_model, EngineConfig(max_batch=2, block_size=BS))
    frames, mask = prompt("Same words twice.", 0, history(1))
    a = submit(engine, frames, mask, 3, seed=5, **GEN)
    first = a.codes()
    b = submit(engine, frames, mask, 3, seed=5, **GEN)
    assert torch.equal(b.codes(), first)
    assert b.stats.reused_positions == (len(frames) - 1) // BS * BS > 0
    engine.close()


def test_eviction_under_a_small_pool_stays_correct(tiny_model):
    """A pool that holds about two requests: later prompts evict earlier prefixes (tails first);
    every request still gets the reference codes, and a partly evicted prefix is partly reused."""
    prompts = [prompt(f"Prompt number {i}.", i % 2, history(2, frames=8, name=f"{i}: ")) for i in range(3)]
    per_request = max(-(-(len(f) + 4 - 1) // BS) for f, _ in prompts)
    engine = Engine(tiny_model, EngineConfig(max_batch=1, block_size=BS, num_blocks=per_request + 3))
    expected = [generate_codes(tiny_model, f, m, 4, seed=i, **GEN) for i, (f, m) in enumerate(prompts)]
    reused = []
    for i in [0, 1, 0, 2, 1, 0]:
        stream = submit(engine, *prompts[i], 4, seed=i, **GEN)
        assert torch.equal(stream.codes(), expected[i]), f"prompt {i}"
        reused.append(stream.stats.reused_positions)
        assert engine.pool.all_free()
    assert reused[0] == reused[1] == 0
    # The second run of prompt 0 finds the head of its blocks (shared history) still cached.
    assert 0 < reused[2] < len(prompts[0][0]) - 1
    engine.close()
