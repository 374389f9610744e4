"""Text tokenizers: Llama-3 (from a checkpoint's tokenizer.json) and a byte-level one for `tiny`.

Both wrap a text in BOS ... EOS, as Sesame's generator does with its template post-processor.
"""
from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; BOS and EOS take the ids after them."""

    def __init__(self, bos_id: int = 256, eos_id: int = 257):
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *text.encode("utf-8"), self.eos_id]


class Llama3Tokenizer:
    def __init__(self, path: str | Path, bos_id: int = 128000, eos_id: int = 128001):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_id]


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
            "or pass tokenizer=PATH to misotts.load"
        )
    return Llama3Tokenizer(path, config.bos_id, config.eos_id)
