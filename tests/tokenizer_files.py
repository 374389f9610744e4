"""tokenizer.json files written by tests, with the `tokenizers` package."""


def write_templated_tokenizer(path, bos: int, eos: int, names=("<s>", "</s>"), bos_only_template=False):
    """A WordLevel tokenizer.json whose template post-processor wraps a text in its own BOS/EOS
    (as a transformers CSM checkpoint's does); bos_only_template: Llama 3's layout instead, a
    template with BOS only inside a Sequence, EOS only among the added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "[0]hello": 1, "world": 2, names[0]: bos, names[1]: eos}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(names))
    if bos_only_template:
        template = processors.TemplateProcessing(single=f"{names[0]} $A", special_tokens=[(names[0], bos)])
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{names[0]} $A {names[1]}", pair=f"{names[0]} $A {names[1]} {names[0]} $B {names[1]}",
            special_tokens=[(names[0], bos), (names[1], eos)])
    tok.save(str(path))
    return path
