"""Small random transformers CSM models for the weights tests.

Each is a `CsmForConditionalGeneration` with Llama-3 RoPE scaling, a 261-token text vocabulary
(the byte tokenizer's 256 bytes, BOS 256, EOS 257, then transformers' audio placeholders 258 and
259, and a pad id 260 that no prompt uses: generate masks pad positions out) and the default
(random) Mimi codec.
"""
import contextlib

import torch

TEXT_VOCAB, BOS, EOS, AUDIO_TOKEN, AUDIO_EOS_TOKEN, PAD = 261, 256, 257, 258, 259, 260
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@contextlib.contextmanager
def one_thread():
    # These models are tiny: per-op overhead dominates, and on a shared 2-core machine intra-op
    # threads spin against each other (20 frames took 10 s with 2 threads, 0.8 s with 1).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stack(dim, heads, kv_heads, head_dim, ffn):
    return dict(hidden_size=dim, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                intermediate_size=ffn, num_hidden_layers=2, rope_parameters=ROPE)


# Backbone GQA ratios 1/2/4 with head_dim 32/64/128; the decoders mix them the other way round.
# head_dim * heads != dim in most, so the explicit head_dim is exercised too.
HF_SHAPES = {
    "gqa1-hd32": (stack(128, 4, 4, 32, 256), stack(64, 4, 2, 64, 128)),
    "gqa2-hd64": (stack(128, 4, 2, 64, 256), stack(64, 4, 1, 32, 128)),
    "gqa4-hd128": (stack(256, 8, 2, 128, 512), stack(128, 2, 2, 128, 256)),
}


def build_hf_model(name: str, seed: int = 0):
    from transformers import CsmConfig, CsmForConditionalGeneration

    backbone, decoder = HF_SHAPES[name]
    config = CsmConfig(**backbone, text_vocab_size=TEXT_VOCAB, bos_token_id=BOS, pad_token_id=PAD,
                       audio_token_id=AUDIO_TOKEN, audio_eos_token_id=AUDIO_EOS_TOKEN,
                       depth_decoder_config={**decoder, "backbone_hidden_size": backbone["hidden_size"]})
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config).eval()
    # Real checkpoints share the audio table between backbone and depth decoder; make sure this one does.
    model.depth_decoder.model.embed_tokens.weight = model.backbone_model.embed_tokens.embed_audio_tokens.weight
    return model
