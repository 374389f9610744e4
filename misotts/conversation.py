"""Conversations: each turn, generated or given, joins the context of the next.

    chat = tts.conversation()
    a = chat.say("Hi, how are you?", speaker=0)       # each turn joins the history ...
    b = chat.say("Fine, thanks.", speaker=1)          # ... and on the engine the next reuses its KV
"""
from __future__ import annotations

from typing import Iterator

import torch

from misotts.chunks import Audio
from misotts.runtime.prompt import mimi_codes
from misotts.runtime.prompt import Segment, check_audio_path, check_codes


class Conversation:
    """A dialogue whose turns -- generated or given -- become the context of the next turn.

    The engine keeps the KV of earlier turns in its prefix cache, so a new turn prefills only
    its own text (and the audio of given turns not seen before): time to first audio does not
    grow with the history.
    """

    def __init__(self, tts, context=()):
        self.tts = tts
        self.history: list[Segment] = list(context)
        # The last turn's stats (reused_positions / computed_positions among them): its stream's
        # GenerationStats after an audio turn, the engine's RequestStats after say_codes.
        self.last_stats = None

    def _remember(self, speaker: int, text: str, codes: torch.Tensor) -> None:
        # What was heard: special ids (which only an untrained model emits) were played as code 0.
        self.history.append(Segment(speaker, text, codes=mimi_codes(codes)))

    def add(self, speaker: int, text: str, audio=None, codes=None) -> None:
        """A turn that was spoken, not generated: its audio (or Mimi codes) joins the history."""
        # Checked here, not at the next turn: a bad turn would make every later turn fail.
        if audio is not None and codes is not None:
            raise ValueError("give a turn audio or codes, not both")
        check_audio_path(audio)
        if codes is not None:
            codes = check_codes(codes, self.tts.config.num_codebooks)
        self.history.append(Segment(speaker, text, audio=audio, codes=codes))

    def stream(self, text: str, speaker: int = 0, **kwargs) -> Iterator:
        """Speak a turn as `Audio` chunks; the frames made (all of them, or as many as were made
        before the caller stopped) join the history when the iterator ends.  A turn that fails
        joins nothing."""
        made, heard = [], False
        stream = self.tts.stream(text, speaker, list(self.history), **kwargs)
        try:
            for chunk in stream:
                made.append(chunk.codes)
                yield chunk
            heard = True
        except GeneratorExit:  # the caller stopped: what was made so far was heard
            heard = True
            raise
        finally:
            stream.close()
            self.last_stats = stream.stats
            if heard:
                n = self.tts.config.num_codebooks
                self._remember(speaker, text, torch.cat(made) if made else torch.zeros(0, n, dtype=torch.long))

    def say(self, text: str, speaker: int = 0, **kwargs):
        """Speak a turn: the whole `Audio` (as `TTS.generate`), added to the history."""
        chunks = list(self.stream(text, speaker, chunk_frames=kwargs.pop("chunk_frames", 8), **kwargs))
        return Audio.concat(chunks, self.tts.config.num_codebooks)

    def say_codes(self, text: str, speaker: int = 0, **kwargs) -> torch.Tensor:
        """A turn's codes only (no audio decoding), added to the history."""
        request = self.tts.submit(text, speaker, list(self.history), **kwargs)
        codes, self.last_stats = request.codes(), request.stats
        self._remember(speaker, text, codes)
        return codes
