"""The serving engine: paged KV with prefix reuse, continuous batching, CUDA graphs, and the
lanes' audio decode.  Files mirror its parts; `engine.py` is the loop (see its docstring)."""
from .engine import Engine, EngineConfig
from .requests import EngineBusy, EngineStopped, Stream

__all__ = ["Engine", "EngineConfig", "EngineBusy", "EngineStopped", "Stream"]
