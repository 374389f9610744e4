"""`misotts` command line: speak, info, convert, serve."""
from __future__ import annotations

import argparse
import json
import sys

import torch

from misotts.chunks import Audio

UNTRAINED_NOTE = "note: the model is {}: untrained, so the audio is noise, not speech."
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset (tiny, csm-1b, miso-8b), local path or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--random-init", action="store_true", help="seeded random weights of the preset's shape")
    p.add_argument("--codec", default=None, help="Mimi weights (.safetensors path or hub id)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")


def _load(args):
    import misotts

    return misotts.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                        random_init=args.random_init, codec=args.codec, tokenizer=args.tokenizer)


def _parse_context(items: list[str]):
    """--context SPEAKER:TEXT[:WAV] -> Segments, in order."""
    import misotts

    segments = []
    for item in items or ():
        parts = item.split(":", 2)
        if len(parts) < 2 or not parts[0].strip().isdigit():
            raise SystemExit(f"error: --context takes SPEAKER:TEXT[:WAV], got {item!r}")
        segments.append(misotts.Segment(int(parts[0]), parts[1], parts[2] if len(parts) == 3 else None))
    return segments


def cmd_speak(args) -> int:
    tts = _load(args)
    if tts.untrained:
        print(UNTRAINED_NOTE.format(tts.source), file=sys.stderr)
    chunks = list(tts.stream(args.text, speaker=args.speaker, context=_parse_context(args.context),
                             max_audio_ms=args.max_audio_ms, temperature=args.temperature, topk=args.topk,
                             seed=args.seed))
    if not chunks:
        print("the model ended the utterance before the first frame; nothing written", file=sys.stderr)
        return 1
    audio = Audio.concat(chunks, tts.config.num_codebooks)
    path = audio.save(args.output)
    s = tts.last_stats
    print(f"wrote {path} ({audio.duration_s:.2f} s, {audio.codes.shape[0]} frames, {audio.sample_rate} Hz)")
    print(f"time to first audio {s.first_audio_s * 1000:.1f} ms | {s.frames_per_s:.1f} frames/s | "
          f"real-time factor {s.real_time_factor:.3f} (device {tts.device})")
    return 0


def cmd_info(args) -> int:
    tts = _load(args)
    info = tts.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = tts.config
    print(f"model      {info['source']}" + ("  [untrained: random weights]" if tts.untrained else ""))
    for name, t in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        print(f"{name:<10} dim {t.dim}, {t.n_layers} layers, {t.n_heads} heads / {t.n_kv_heads} kv, "
              f"head_dim {t.head_dim}, ffn {t.ffn_dim}")
    print(f"vocab      text {cfg.text_vocab_size}, audio {cfg.audio_vocab_size} x {cfg.num_codebooks} codebooks; "
          f"context {cfg.max_seq_len}")
    print(f"parameters {info['parameters'] / 1e6:,.1f} M ({info['weight_bytes'] / 2**30:.2f} GiB as {info['dtype']})")
    print(f"device     {info['device']}; codec {info['codec']}")
    if tts.device.type == "cuda":
        print(f"GPU memory allocated {torch.cuda.memory_allocated(tts.device) / 2**30:.2f} GiB")
    return 0


def cmd_convert(args) -> int:
    from misotts.weights import convert

    out = convert(args.src, args.dst, shard_size=args.shard_size, overwrite=args.overwrite)
    print(f"wrote {out or args.dst}")
    return 0


def cmd_serve(args) -> int:
    import logging
    import os

    import uvicorn

    from misotts.server import create_app
    from misotts.server.voices import VoiceStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = {"max_batch": args.max_batch, "max_waiting": args.max_waiting}
    import misotts

    # Loaded and warmed (engine, graphs, the lanes' Mimi) before the port opens.
    tts = misotts.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                       random_init=args.random_init, codec=args.codec, tokenizer=args.tokenizer,
                       engine={k: v for k, v in engine.items() if v is not None})
    if tts.untrained:
        print(UNTRAINED_NOTE.format(tts.source), file=sys.stderr)
    api_key = args.api_key or os.environ.get("MISOTTS_API_KEY") or None
    app = create_app(tts, model_name=args.model, api_key=api_key, voices=VoiceStore(args.voices_dir))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        tts.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misotts", description="MisoTTS runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speak", help="synthesize speech to a WAV file")
    p.add_argument("text")
    p.add_argument("-o", "--output", default="out.wav")
    p.add_argument("--speaker", type=int, default=0)
    p.add_argument("--context", action="append", metavar="SPEAKER:TEXT[:WAV]",
                   help="an earlier turn (repeatable, in order); WAV is its audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--topk", type=int, default=50)
    p.add_argument("--max-audio-ms", type=float, default=10_000)
    _add_model_args(p)
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("info", help="show a model's config, parameter count and memory")
    p.add_argument("--json", action="store_true")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to MisoTTS's canonical format")
    p.add_argument("src", help="checkpoint directory or hub id (transformers, Sesame or ours)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="serve OpenAI's speech API (HTTP) on one warm engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MISOTTS_API_KEY)")
    p.add_argument("--voices-dir", default="voices", help="where registered voices are stored")
    p.add_argument("--max-batch", type=int, default=None, help="engine lanes (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests before 429 (default 64)")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    from misotts.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
