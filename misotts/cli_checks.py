"""Every command-line argument checked before a model is loaded (loading csm-1b takes half a
minute; a typo should not wait for it).  Each check raises ValueError / FileNotFoundError with
the flag's name; the CLI prints it and exits 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from misotts.runtime.config import PRESETS
from misotts.runtime.devices import resolve_device
from misotts.runtime.hub import HUB_ID, PRESET_HUB_IDS
from misotts.runtime.prompt import Segment

CONTEXT_SYNTAX = "--context SPEAKER TEXT [AUDIO]"


def check_model(name: str, random_init: bool) -> None:
    """--model is a preset, a checkpoint folder or a hub id (fetched later), as --random-init allows."""
    from misotts.weights.load import not_found_message

    if name in PRESETS:
        if not random_init and name != "tiny" and name not in PRESET_HUB_IDS:
            raise ValueError(f"no public checkpoint is known for {name!r}: pass a checkpoint folder with --model, "
                             f"or --random-init for seeded random weights of this shape")
        return
    if random_init:
        raise ValueError(f"--random-init builds a preset ({', '.join(PRESETS)}), not {name!r}")
    path = Path(name).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ValueError(f"--model {name} is a file: pass the checkpoint folder that holds it")
    if not HUB_ID.fullmatch(name):
        raise FileNotFoundError(not_found_message(name))


def check_file(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")


def check_codec(codec: str | None) -> None:
    """--codec: an existing file or folder, or a hub id (fetched later)."""
    if codec is None or codec == "hub" or Path(codec).expanduser().exists():
        return
    if not HUB_ID.fullmatch(codec) or codec.endswith((".safetensors", ".sft")):
        raise FileNotFoundError(f"--codec {codec}: no such file or folder (a Mimi .safetensors file, a CSM "
                                f"checkpoint folder with its codec, or a hub id)")


def check_model_args(args, run: bool = True) -> None:
    """run=False (info): the model is described, not run, so any --weights scheme is fine."""
    check_model(args.model, args.random_init)
    device = resolve_device(args.device)
    check_codec(args.codec)
    check_file(args.tokenizer, "--tokenizer")
    check_weights(args.weights, device if run else None)


def check_weights(weights: str | None, device=None) -> None:
    """--weights: a scheme we know, and (given the device) one it runs."""
    from misotts.weights.quantize import check_device, check_scheme

    check_scheme(weights)
    if device is not None:
        check_device(weights, device)


def read_text(args) -> str:
    """The text to speak: the argument, stdin for "-", or --text-file."""
    if (args.text is None) == (args.text_file is None):
        raise ValueError("give the text to speak as an argument, '-' to read it from stdin, or --text-file PATH "
                         "(one of them)")
    if args.text_file is not None:
        check_file(args.text_file, "--text-file")
        text = Path(args.text_file).expanduser().read_text(encoding="utf-8")
    elif args.text == "-":
        text = sys.stdin.read()
    else:
        text = args.text
    if not text.strip():
        raise ValueError("the text to speak is empty")
    return text.strip()


def parse_context(items: list[list[str]] | None) -> list[Segment]:
    """--context SPEAKER TEXT [AUDIO], repeated, in order: TEXT is one argument and may hold anything."""
    segments = []
    for item in items or ():
        if len(item) not in (2, 3) or not item[0].isdigit():
            hint = " (the SPEAKER:TEXT form is gone: TEXT may contain colons now)" if len(item) == 1 and ":" in item[0] else ""
            raise ValueError(f"{CONTEXT_SYNTAX} takes a speaker number, the text and optionally an audio file, "
                             f"got {item}{hint}")
        audio = item[2] if len(item) == 3 else None
        check_file(audio, "--context audio")
        segments.append(Segment(int(item[0]), item[1], audio))
    return segments


def read_context_file(path: str | None) -> list[Segment]:
    """--context-file: JSON Lines, one turn per line: {"speaker": 1, "text": "...", "audio": "a.wav"}
    (audio optional, relative to the file's folder)."""
    if path is None:
        return []
    check_file(path, "--context-file")
    file = Path(path).expanduser()
    segments = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"--context-file {path}, line {n}"
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if (not isinstance(turn, dict) or not isinstance(turn.get("speaker"), int) or turn["speaker"] < 0
                or not isinstance(turn.get("text"), str) or set(turn) - {"speaker", "text", "audio"}):
            raise ValueError(f'{where}: expected {{"speaker": 0, "text": "...", "audio": "optional.wav"}}, got {line.strip()}')
        audio = turn.get("audio")
        if audio is not None:
            audio = str(file.parent / Path(audio).expanduser())
            check_file(audio, f"{where}: audio")
        segments.append(Segment(turn["speaker"], turn["text"], audio))
    return segments


def check_output(output: str) -> None:
    if output == "-":
        return
    path = Path(output).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"-o {output} is a folder: name the WAV file to write")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"-o {output}: {parent} is a file, not a folder")
    if not parent.exists():  # a typo in a folder name should not become a new folder
        raise FileNotFoundError(f"-o {output}: the folder {parent} does not exist")


def check_generation_args(args) -> None:
    if not 0 <= args.seed <= 2**63 - 1:
        raise ValueError(f"--seed must be in 0..2**63-1, got {args.seed}")
    if args.speaker < 0:
        raise ValueError(f"--speaker must be >= 0, got {args.speaker}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    if args.topk < 1:
        raise ValueError(f"--topk must be >= 1 (1 is greedy), got {args.topk}")
    if not args.max_audio_ms > 0:
        raise ValueError(f"--max-audio-ms must be > 0, got {args.max_audio_ms}")


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")


def api_key(flag: str | None, env: str | None) -> str | None:
    """--api-key, else MISOTTS_API_KEY, else None (no key); an empty or unsendable key is refused."""
    from misotts.server.auth import check_api_key

    if flag is not None:
        try:
            return check_api_key(flag)
        except ValueError as e:
            raise ValueError(f"--api-key: {e}") from None
    if env is not None:
        try:
            return check_api_key(env)
        except ValueError as e:
            raise ValueError(f"MISOTTS_API_KEY: {e}") from None
    return None


def require_extra(modules: tuple[str, ...], extra: str, command: str) -> None:
    """Each module importable, or one line naming the pip command that installs them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"{command} needs {', '.join(missing)}, from the {extra!r} extra: "
                         f'pip install "misotts[{extra}]" (in a checkout: pip install -e ".[{extra}]")')


# Optional packages, and the pip command that brings each.
EXTRAS = {"transformers": '"transformers>=5.0" (or pip install -e ".[dev]")', "fastapi": '-e ".[server]"',
          "uvicorn": '-e ".[server]"', "av": '-e ".[server]"', "prometheus_client": '-e ".[server]"',
          "multipart": '-e ".[server]"', "ray": '-e ".[ray]"', "matplotlib": "matplotlib"}


def missing_module(name: str) -> str:
    return f"the {name} package is needed here and is not installed: pip install {EXTRAS[name]}"


def check_convert_source(src: str) -> None:
    """convert SRC: a checkpoint folder or a hub id; a preset other than one naming a public
    checkpoint is only a shape (random weights), nothing to convert."""
    if src in PRESETS:
        if src in PRESET_HUB_IDS:
            return
        raise ValueError(f"{src!r} is a preset with random weights only: there is no checkpoint to convert; give a "
                         "checkpoint folder or a hub id (owner/name)")
    path = Path(src).expanduser()
    if not path.is_dir() and not HUB_ID.fullmatch(src):
        raise FileNotFoundError(f"{src}: no such checkpoint folder (SRC is a folder or a hub id owner/name)")
