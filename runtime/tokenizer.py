"""Text tokenizers: Llama-3 (from a checkpoint's tokenizer.json) and a byte-level one for `tiny`.

Both wrap a text in BOS ... EOS, as Sesame's generator does with its template post-processor
(made from the tokenizer's own bos/eos tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

LLAMA3_BOS_TOKEN, LLAMA3_EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; BOS and EOS take the ids after them."""

    def __init__(self, bos_id: int = 256, eos_id: int = 257):
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]


class Llama3Tokenizer:
    """A tokenizer.json, wrapping each text in the file's own BOS and EOS ids.

    bos_id, eos_id: used only for an end the file names no token for (see `special_ids`).
    """

    def __init__(self, path: str | Path, bos_id: int = 128000, eos_id: int = 128001):
        from tokenizers import Tokenizer

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (--tokenizer / tokenizer=): "
                                    "pass a tokenizer.json file")
        try:
            self._tok = Tokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type for a bad file
            raise ValueError(f"cannot read tokenizer {path} (--tokenizer / tokenizer=): {e}") from None
        bos, eos = special_ids(spec)
        # A file without them (a bare vocabulary) keeps the ids the model config names.
        self.bos_id = bos_id if bos is None else bos
        self.eos_id = eos_id if eos is None else eos

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_id]


def special_ids(spec: dict) -> tuple[int | None, int | None]:
    """(BOS, EOS) a tokenizer.json wraps a text in, None where it names none.

    First its post-processor's template (what transformers encodes CSM prompts with; a CSM
    checkpoint's puts BOS before the text and EOS after it), then, for an end the template
    leaves empty (Llama 3's adds BOS only), the Llama-3 tokens among its added tokens, which
    are the bos/eos that Sesame's generator builds its template from.
    """
    bos, eos = _template_ends(spec.get("post_processor"))
    added = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or ()}
    return (added.get(LLAMA3_BOS_TOKEN) if bos is None else bos,
            added.get(LLAMA3_EOS_TOKEN) if eos is None else eos)


def _template_ends(processor: dict | None) -> tuple[int | None, int | None]:
    """The one special id before and after the text ($A) in a TemplateProcessing's single-text
    template, also inside a Sequence of processors; None for an end with none or several."""
    if not processor:
        return None, None
    if processor.get("type") == "Sequence":
        ends = [_template_ends(p) for p in processor.get("processors") or ()]
        return (next((b for b, _ in ends if b is not None), None),
                next((e for _, e in ends if e is not None), None))
    if processor.get("type") != "TemplateProcessing":
        return None, None
    single = processor.get("single") or []
    text = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
    if text is None:
        return None, None
    specials = processor.get("special_tokens") or {}

    def one_id(pieces) -> int | None:
        ids = [i for p in pieces if "SpecialToken" in p for i in specials[p["SpecialToken"]["id"]]["ids"]]
        return ids[0] if len(ids) == 1 else None

    return one_id(single[:text]), one_id(single[text + 1:])


def load_tokenizer(config, checkpoint_dir: str | Path | None):
    """The tokenizer a model config asks for; tokenizer.json is looked up beside the weights."""
    if config.tokenizer == "bytes":
        return ByteTokenizer(config.bos_id, config.eos_id)
    path = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir is not None else None
    if path is None or not path.is_file():
        where = f"in {checkpoint_dir}" if checkpoint_dir is not None else "for a model without a checkpoint folder"
        raise FileNotFoundError(
            f"no tokenizer.json {where}: this model uses the Llama-3 tokenizer. Copy tokenizer.json "
            "(from meta-llama/Llama-3.2-1B or the model's hub repo) into the checkpoint folder, "
            "or pass one with --tokenizer PATH / tokenizer=PATH"
        )
    return Llama3Tokenizer(path, config.bos_id, config.eos_id)


def check_special_ids(tokenizer, text_vocab_size: int, where: str) -> None:
    """The BOS/EOS a tokenizer wraps every text in must have embedding rows, or every prompt fails."""
    for name in ("bos_id", "eos_id"):
        value = getattr(tokenizer, name)
        if not 0 <= value < text_vocab_size:
            raise ValueError(f"{where}: {name} {value} is outside the model's text vocabulary of {text_vocab_size} "
                             f"ids (fix config.json's {name}, or pass a matching tokenizer with --tokenizer / tokenizer=)")
