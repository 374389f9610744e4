"""`misotts` command line: speak, info, convert, serve (and bench).

Exit status: 0 done, 2 any error (bad arguments, files, models, devices: the message says which
flag), 1 when the model ended the utterance before its first frame and nothing was written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from misotts import MOSHI_MISSING, __version__
from misotts import cli_checks as checks
from misotts.chunks import Audio, GenerationStats
from misotts.runtime.devices import DTYPES, resolve_device

EXIT_ERROR, EXIT_NOTHING_MADE = 2, 1
UNTRAINED_NOTE = ("note: the model is {}: untrained, so the audio is noise, not speech; untrained weights never "
                  "end a turn, so it runs to --max-audio-ms ({:.1f} s).")


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one worth showing (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:  # "in" would drop 0 (0 == False)
            return action.help
        return super()._get_help_string(action)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset (tiny, csm-1b, miso-8b), checkpoint folder or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--random-init", action="store_true", help="seeded random weights of the preset's shape")
    p.add_argument("--codec", default=None,
                   help="Mimi weights: a .safetensors file, a CSM checkpoint folder or a hub id (default: the "
                        "checkpoint's own, else kyutai/moshiko-pytorch-bf16; the untrained Mimi for random weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--weights", default=None, metavar="SCHEME",
                   help="quantise the linears as they load: int8 (CPU or GPU), fp8 (GPU, sm_89+) or int4 (GPU; "
                        "int4 backbone, int8 depth decoder); default: the dtype's (a quantised checkpoint: its own)")


def _load(args):
    import misotts

    return misotts.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                        random_init=args.random_init, codec=args.codec, tokenizer=args.tokenizer,
                        weights=args.weights)


def cmd_speak(args) -> int:
    # Everything is checked before the model loads (csm-1b takes half a minute to).
    text = checks.read_text(args)
    checks.check_generation_args(args)
    context = checks.read_context_file(args.context_file) + checks.parse_context(args.context)
    checks.check_output(args.output)
    checks.check_model_args(args)
    to_stdout = args.output == "-"
    report = sys.stderr if to_stdout else sys.stdout  # stdout carries the WAV then

    tts = _load(args)
    if tts.untrained:
        print(UNTRAINED_NOTE.format(tts.source, args.max_audio_ms / 1000), file=sys.stderr)
    chunks, s = _generate_with_progress(tts, text, context, args)
    if not chunks:
        print("the model ended the utterance before the first frame; nothing written", file=sys.stderr)
        return EXIT_NOTHING_MADE
    audio = Audio.concat(chunks, tts.config.num_codebooks)
    where = "stdout" if to_stdout else audio.save(args.output)
    if to_stdout:
        audio.save(sys.stdout.buffer)
        sys.stdout.buffer.flush()
    print(f"wrote {where} ({audio.duration_s:.2f} s, {audio.codes.shape[0]} frames, {audio.sample_rate} Hz)", file=report)
    print(f"time to first audio {s.first_audio_s * 1000:.1f} ms | {s.frames_per_s:.1f} frames/s | "
          f"real-time factor {s.real_time_factor:.3f} (device {tts.device})", file=report)
    return 0


def _generate_with_progress(tts, text, context, args) -> tuple[list[Audio], GenerationStats]:
    """The chunks of one generation and its stats, with a bar of frames, audio seconds and
    real-time factor on a terminal (tqdm's disable=None: nothing when stderr is piped)."""
    chunks = []
    params = tts.params(speaker=args.speaker, max_audio_ms=args.max_audio_ms, temperature=args.temperature,
                        topk=args.topk, seed=args.seed)
    stream = tts.stream(text, context=context, params=params, chunk_frames=4)
    with tqdm(total=params.max_frames, unit="frame", desc="speaking", disable=None, leave=False) as bar:
        for chunk in stream:
            chunks.append(chunk)
            s = stream.stats
            bar.update(len(chunk.codes))
            bar.set_postfix_str(f"{s.audio_s:.1f} s audio, real-time factor {s.real_time_factor:.2f}")
    return chunks, stream.stats


def cmd_info(args) -> int:
    from misotts.model_info import describe

    checks.check_model_args(args, run=False)
    info = describe(args.model, args.device, DTYPES[args.dtype] if args.dtype else None, args.random_init, args.codec,
                    args.weights)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"model      {info['source']}" + ("  [untrained: random weights]" if info["untrained"] else ""))
    for name in ("backbone", "decoder"):
        t = cfg[name]
        print(f"{name:<10} dim {t['dim']}, {t['n_layers']} layers, {t['n_heads']} heads / {t['n_kv_heads']} kv, "
              f"head_dim {t['head_dim']}, ffn {t['ffn_dim']}")
    print(f"vocab      text {cfg['text_vocab_size']}, audio {cfg['audio_vocab_size']} x {cfg['num_codebooks']} "
          f"codebooks; context {cfg['backbone']['max_seq_len']}")
    as_what = info["dtype"] + (f" with {info['weights']} weights" if info["weights"] else "")
    print(f"parameters {info['parameters'] / 1e6:,.1f} M ({info['weight_bytes'] / 2**30:.2f} GiB as {as_what})")
    free = info["free_bytes"]
    room = "" if free is None else f" ({free / 2**30:.1f} GiB free{'' if free >= info['weight_bytes'] else ': the weights do not fit'})"
    print(f"device     {info['device']}{room}; codec {info['codec']}")
    return 0


def cmd_convert(args) -> int:
    from misotts.weights import convert

    checks.check_weights(args.weights)
    checks.check_convert_source(args.src)

    from misotts.runtime.hub import PRESET_HUB_IDS

    out = convert(PRESET_HUB_IDS.get(args.src, args.src), args.dst, shard_size=args.shard_size,
                  overwrite=args.overwrite, weights=args.weights)
    print(f"wrote {out or args.dst}")
    return 0


def cmd_serve(args) -> int:
    import logging
    import os

    _check_serve_args(args)  # before anything loads
    from misotts.server import create_app
    from misotts.server.run import bind, serve
    from misotts.server.voices import VoiceStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = _engine_settings(args)
    api_key = checks.api_key(args.api_key, os.environ.get("MISOTTS_API_KEY"))
    if args.ray:
        return _serve_on_ray(args, engine, api_key)
    import misotts

    sock = bind(args.host, args.port)  # a port in use is found now, not after the model loaded

    # Loaded and warmed (engine, graphs, the lanes' Mimi) before the port opens.
    tts = misotts.load(args.model, device=args.device, dtype=DTYPES[args.dtype] if args.dtype else None,
                       random_init=args.random_init, codec=args.codec, tokenizer=args.tokenizer, engine=engine,
                       weights=args.weights)
    if tts.untrained:
        print(f"note: the model is {tts.source}: untrained, so the audio is noise, not speech; untrained weights "
              "never end a turn, so each request runs to its max_audio_ms.", file=sys.stderr)
    app = create_app(tts, model_name=args.model, api_key=api_key, voices=VoiceStore(args.voices_dir),
                     voice_aliases=_voice_aliases(args.voice_alias))
    try:
        serve(app, sock, grace_s=args.shutdown_grace, max_connections=args.max_connections)
    finally:
        sock.close()
        tts.close()
    return 0


def _engine_settings(args) -> dict:
    """The EngineConfig fields `serve` sets (the same for its engine and for every Ray replica's);
    the rest keep EngineConfig's defaults."""
    engine = {"max_batch": args.max_batch, "max_waiting": args.max_waiting, "prefill_chunk": args.prefill_chunk,
              "kv_memory_fraction": args.kv_memory_fraction}
    return {k: v for k, v in engine.items() if v is not None}


def _voice_aliases(given: list[str] | None) -> dict:
    """--voice-alias alloy=anna ... -> {"alloy": "anna"} (create_app checks the names)."""
    from misotts.server.speech import OPENAI_VOICES

    aliases = {}
    for item in given or []:
        name, sep, voice = item.partition("=")
        if not sep or name not in OPENAI_VOICES or not voice:
            raise ValueError(f"--voice-alias takes NAME=VOICE, NAME one of {', '.join(OPENAI_VOICES)} and VOICE "
                             f"a registered voice; got {item!r}")
        aliases[name] = voice
    return aliases


def _serve_on_ray(args, engine: dict, api_key: str | None) -> int:
    from misotts.server import ray_config

    try:
        from misotts.server import ray_serve
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "ray":
            raise
        raise ValueError('--ray needs Ray Serve: pip install -e ".[ray]" (or pip install "ray[serve]")') from None
    config = ray_config.ReplicaConfig(model=args.model, device=args.device, dtype=args.dtype,
                                     random_init=args.random_init, codec=args.codec, tokenizer=args.tokenizer,
                                     engine=engine, voices_dir=str(Path(args.voices_dir).resolve()), api_key=api_key,
                                     threads=args.threads)
    ray_serve.run(config, _ray_scaling(args), args.host, args.port, address=args.ray_address)
    return 0


def _ray_scaling(args):
    from misotts.server.ray_config import Scaling, parse_autoscale

    return Scaling(replicas=1 if args.replicas is None else args.replicas, target_ongoing=args.target_ongoing,
                   cpus=float(args.threads or 1), autoscale=parse_autoscale(args.autoscale) if args.autoscale else None)


def _check_serve_args(args) -> None:
    checks.require_extra(("fastapi", "uvicorn", "av", "prometheus_client", "multipart"), "server", "serve")
    checks.check_port(args.port)
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be >= 0 seconds, got {args.shutdown_grace}")
    if args.max_connections is not None and args.max_connections < 1:
        raise ValueError(f"--max-connections must be >= 1, got {args.max_connections}")
    for flag, value in (("--max-batch", args.max_batch), ("--max-waiting", args.max_waiting),
                        ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.kv_memory_fraction is not None and not 0 < args.kv_memory_fraction <= 1:
        raise ValueError(f"--kv-memory-fraction must be in (0, 1], got {args.kv_memory_fraction}")
    ray_only = [flag for flag, value in (("--replicas", args.replicas), ("--autoscale", args.autoscale),
                                         ("--target-ongoing", args.target_ongoing), ("--ray-address", args.ray_address),
                                         ("--threads", args.threads)) if value is not None]
    if ray_only and not args.ray:
        raise ValueError(f"{', '.join(ray_only)}: for Ray Serve only; add --ray")
    if args.weights is not None and args.ray:
        raise ValueError("--weights is not passed to Ray Serve replicas yet: serve quantised weights without --ray")
    checks.check_weights(args.weights, None if args.ray else resolve_device(args.device))
    if args.voice_alias and args.ray:
        raise ValueError("--voice-alias: not with --ray yet (the plain server only)")
    _voice_aliases(args.voice_alias)
    if args.replicas is not None and args.autoscale is not None:
        raise ValueError("give --replicas N or --autoscale MIN:MAX, not both")
    if args.ray:
        from misotts.server.ray_config import check_scaling

        check_scaling(_ray_scaling(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misotts", description="MisoTTS runtime: text to speech with CSM-style models")
    parser.add_argument("--version", action="version", version=f"misotts {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = _HelpWithDefaults

    p = sub.add_parser("speak", help="synthesize speech to a WAV file", formatter_class=defaults,
                       description="Synthesize TEXT as SPEAKER's next turn after the --context turns, to a 16-bit "
                                   "24 kHz WAV. Shows progress on a terminal.")
    p.add_argument("text", nargs="?", help="the text to speak; '-' reads it from stdin")
    p.add_argument("--text-file", metavar="PATH", help="read the text to speak from a file")
    p.add_argument("-o", "--output", default="out.wav", help="WAV file to write; '-' writes the WAV to stdout")
    p.add_argument("--speaker", type=int, default=0, help="speaker id of the new turn (0, 1, ...)")
    p.add_argument("--context", action="append", nargs="+", metavar=("SPEAKER", "TEXT [AUDIO]"),
                   help="an earlier turn: speaker id, its text (one argument, any characters) and optionally its "
                        "audio file (WAV, FLAC, MP3, OGG); repeat in order")
    p.add_argument("--context-file", metavar="PATH",
                   help='earlier turns as JSON Lines, one per line: {"speaker": 1, "text": "...", "audio": "a.wav"} '
                        "(audio optional, relative to the file); they come before any --context")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same audio")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature; 0 is greedy")
    p.add_argument("--topk", type=int, default=50, help="sample among the k most likely codes; 1 is greedy")
    p.add_argument("--max-audio-ms", type=float, default=10_000,
                   help="stop after this much audio (the model may end its turn sooner)")
    _add_model_args(p)
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("info", help="show a model's config, parameter count and memory", formatter_class=defaults,
                       description="Describe a model from its config alone (no weights are loaded or built).")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a checkpoint to MisoTTS's canonical format", formatter_class=defaults)
    p.add_argument("src", help="checkpoint directory or hub id (transformers, Sesame or ours)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB, 1GiB")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty dst")
    p.add_argument("--weights", default=None, metavar="SCHEME",
                   help="store the linears quantised: int8, fp8 or int4 (loads without quantising again)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="serve OpenAI's speech API (HTTP) on one warm engine")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set MISOTTS_API_KEY)")
    p.add_argument("--voices-dir", default="voices", help="where registered voices are stored")
    p.add_argument("--max-batch", type=int, default=None, help="engine lanes (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--max-waiting", type=int, default=None, help="queued requests before 429 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="prompt positions prefilled per frame boundary, all admitted prompts in one call (default 512)")
    p.add_argument("--kv-memory-fraction", type=float, default=None, metavar="F",
                   help="share of the free GPU memory for the KV pool (default 0.8)")
    p.add_argument("--shutdown-grace", type=float, default=5.0, metavar="S",
                   help="on SIGTERM / Ctrl-C, seconds streams in flight get to finish before they are ended "
                        "(default 5; a second signal exits at once)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections (and requests in flight) beyond which the server answers 503 (default 512)")
    p.add_argument("--voice-alias", action="append", metavar="NAME=VOICE",
                   help="a built-in voice name (alloy, ...) that speaks as a registered voice; repeatable")
    ray = p.add_argument_group("Ray Serve (pip install -e \".[ray]\"): one engine per replica behind one port")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve (a local Ray, or --ray-address)")
    ray.add_argument("--replicas", type=int, default=None, help="engine replicas (default 1; one GPU each on GPUs)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", default=None,
                     help="engine replicas scaled between MIN and MAX on ongoing requests")
    ray.add_argument("--target-ongoing", type=float, default=None,
                     help="autoscaling's ongoing requests per replica (default: 3/4 of the engine's lanes)")
    ray.add_argument("--ray-address", default=None, help="a Ray cluster to join ('auto': the one this node runs)")
    ray.add_argument("--threads", type=int, default=None, help="torch threads per CPU replica")
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    from misotts.bench.cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top == "moshi":
            print(f"misotts {args.command}: error: {MOSHI_MISSING}", file=sys.stderr)
        elif top in checks.EXTRAS:
            print(f"misotts {args.command}: error: {checks.missing_module(top)}", file=sys.stderr)
        else:
            raise
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing files, folders, full disks
        print(f"misotts {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
