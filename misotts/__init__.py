"""MisoTTS: a fast runtime for RVQ text-to-dialogue speech models (MisoTTS 8B, Sesame CSM-1B).

    import misotts
    tts = misotts.load("tiny")
    audio = tts.generate("Hello there.", speaker=0)
    audio.save("out.wav")
"""
from misotts.api import TTS, Audio, GenerationStats, load
from misotts.runtime.prompt import Segment

__all__ = ["load", "TTS", "Audio", "Segment", "GenerationStats"]
__version__ = "0.1.0"
