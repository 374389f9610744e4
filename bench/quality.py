"""Speech quality of quantised weights on a trained checkpoint: word error rate through any local
ASR model (a script, never a test; random weights make noise, so only real checkpoints tell):

    python -m misotts.bench.quality --model ~/models/csm-1b --asr ~/models/whisper-small \\
        [--weights int8 fp8 int4] [--sentences FILE] [--device cuda] [--seed 0] [--out FILE]

Each sentence is spoken by the unquantised model and by each `--weights` scheme (same speaker,
seed and sampling), transcribed by the ASR model, and scored against the sentence: WER per
scheme (jiwer, on lower-cased words without punctuation), and the change against the
unquantised model's WER.  `--asr` is a folder or hub id of a transformers speech-recognition
model (Whisper, wav2vec2, ...), or `module:function` naming a Python function (samples: float32
numpy array at 24 kHz, sample_rate) -> text.  Speaker similarity needs a speaker-embedding model
and is not computed here: listen, or score the WAVs that `--keep-audio DIR` writes.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "I would like a cup of coffee with a little milk, please.",
    "We will meet at the station at half past nine tomorrow morning.",
    "She sells sea shells by the sea shore.",
    "Turn left at the second traffic light, then keep going until you see the park.",
]


def load_asr(spec: str, device: str | None = None) -> Callable[[np.ndarray, int], str]:
    """A transcriber from `spec`: "module:function", else a transformers ASR model's folder or hub id."""
    module, sep, function = spec.partition(":")
    if sep and not Path(spec).expanduser().exists() and module.replace(".", "").replace("_", "").isalnum():
        return getattr(importlib.import_module(module), function)
    import soxr
    from transformers import pipeline

    path = Path(spec).expanduser()
    asr = pipeline("automatic-speech-recognition", model=str(path) if path.exists() else spec, device=device)
    rate = asr.feature_extractor.sampling_rate

    def transcribe(samples: np.ndarray, sample_rate: int) -> str:
        # Resampled here (soxr, as the runtime does): the pipeline would need torchaudio for it.
        audio = soxr.resample(samples, sample_rate, rate) if sample_rate != rate else samples
        return asr({"raw": audio.astype(np.float32), "sampling_rate": rate})["text"]

    return transcribe


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    refs = [normalise(r) for r in references]
    hyps = [normalise(h) or "<empty>" for h in hypotheses]  # jiwer refuses an empty hypothesis
    return jiwer.wer(refs, hyps)


def speak_all(tts, sentences: list[str], args) -> list:
    return [tts.generate(s, speaker=args.speaker, max_audio_ms=args.max_audio_ms, temperature=args.temperature,
                         topk=args.topk, seed=args.seed) for s in sentences]


def main(argv=None) -> int:
    import torch

    import misotts
    from misotts.runtime.devices import DTYPES
    from misotts.weights.quantize import SCHEMES, check_scheme

    p = argparse.ArgumentParser(prog="python -m misotts.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder, hub id or preset (with --random-init)")
    p.add_argument("--asr", required=True, help="ASR model folder / hub id, or module:function")
    p.add_argument("--weights", nargs="+", default=list(SCHEMES), help="schemes to compare with the unquantised model")
    p.add_argument("--sentences", default=None, help="a text file, one sentence a line (default: six built in)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    p.add_argument("--random-init", action="store_true", help="seeded random weights (tests the tool only)")
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--max-audio-ms", type=float, default=10_000)
    p.add_argument("--keep-audio", default=None, metavar="DIR", help="write every clip as a WAV here")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        for scheme in args.weights:
            check_scheme(scheme)
        sentences = (SENTENCES if args.sentences is None else
                     [s for s in Path(args.sentences).expanduser().read_text().splitlines() if s.strip()])
        if not sentences:
            raise ValueError(f"--sentences {args.sentences}: no sentences in it")
        transcribe = load_asr(args.asr, args.device)
    except (ValueError, OSError, ImportError, AttributeError) as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else None
    results = {}
    for weights in (None, *args.weights):
        name = weights or "unquantised"
        tts = misotts.load(args.model, device=args.device, dtype=dtype, random_init=args.random_init,
                           weights=weights, progress=False)
        try:
            clips = speak_all(tts, sentences, args)
        finally:
            tts.close()
        texts = [transcribe(c.samples.numpy().astype(np.float32), c.sample_rate) for c in clips]
        if args.keep_audio:
            folder = Path(args.keep_audio).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(clips):
                c.save(folder / f"{name}-{i:02d}.wav")
        results[name] = {"wer": word_error_rate(sentences, texts), "transcripts": texts}
        del tts, clips
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = results["unquantised"]["wer"]
    print(f"\n{args.model}, {len(sentences)} sentences, ASR {args.asr}\n")
    print("| weights | WER | change vs unquantised |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wer']:.1%} | {r['wer'] - base:+.1%} |")
    if args.out:
        Path(args.out).expanduser().write_text(json.dumps({"model": args.model, "asr": args.asr,
                                                           "sentences": sentences, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
