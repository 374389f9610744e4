"""EngineConfig(compile=True): the Inductor-compiled depth steps give the eager engine's codes."""
import pytest
import torch

from misotts.engine import Engine, EngineConfig

from .conftest import generate, history, make_model, prompt


@pytest.mark.slow
def test_compiled_engine_codes_equal_eager(capsys):
    model = make_model()
    frames, mask = prompt("And what did you think of it?", 1, history(1))
    engines = [Engine(model, EngineConfig(max_batch=1, compile=compile), progress=compile) for compile in (False, True)]
    # The cold compile is tens of seconds on a CPU: it says so while it runs, one line per bucket.
    err = capsys.readouterr().err
    assert "compiling the depth step with Inductor: batch   1 (1/1)" in err
    assert "compiled the depth step for 1 batch size in" in err
    try:
        for kw in (dict(temperature=0.0, topk=50, seed=0), dict(temperature=0.9, topk=50, seed=7)):
            eager, compiled = (generate(engine, frames, mask, 8, stop_on_eos=False, **kw) for engine in engines)
            assert torch.equal(compiled, eager), kw
    finally:
        for engine in engines:
            engine.close()
