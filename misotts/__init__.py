"""MisoTTS: a fast runtime for RVQ text-to-dialogue speech models (MisoTTS 8B, Sesame CSM-1B).

    import misotts
    tts = misotts.load("tiny")
    audio = tts.generate("Hello there.", speaker=0)
    audio.save("out.wav")
"""
__all__ = ["load", "TTS", "Audio", "Segment", "GenerationParams", "GenerationStats"]
__version__ = "0.1.0"

MOSHI_MISSING = ("misotts needs Kyutai's moshi package for the Mimi codec, and it is not installed: "
                 "pip install --no-deps moshi==0.2.13")


def __getattr__(name):
    # The API is imported on first use, so that the command line can import this package and say in
    # one line what is missing (moshi is installed apart, with --no-deps) instead of a traceback.
    import importlib

    if name not in __all__:  # a subpackage (misotts.weights, misotts.engine, ...), as before the API loaded lazily
        try:
            return importlib.import_module(f"misotts.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"misotts.{name}":
                raise
            raise AttributeError(f"module 'misotts' has no attribute {name!r}") from None
    try:
        from misotts import api
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "moshi":
            raise ModuleNotFoundError(MOSHI_MISSING, name="moshi") from None
        raise
    from misotts.runtime.params import GenerationParams
    from misotts.runtime.prompt import Segment

    return {"Segment": Segment, "GenerationParams": GenerationParams}.get(name) or getattr(api, name)
