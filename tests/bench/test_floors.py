"""The floor arithmetic against a hand count on a config small enough to count by hand."""
import torch

from misotts.bench import floors
from misotts.runtime.config import ModelConfig, TransformerConfig
from misotts.runtime.model import CSMModel

# backbone: dim 8, 1 layer, 2 heads / 1 kv head of 4, ffn 16; decoder: dim 4, 1 layer, 1 head of 4, ffn 8;
# 3 codebooks of 5 codes.
CFG = ModelConfig(
    backbone=TransformerConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, head_dim=4),
    decoder=TransformerConfig(dim=4, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8, head_dim=4),
    text_vocab_size=7, audio_vocab_size=5, num_codebooks=3,
)
# By hand:
#   backbone layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192, mlp 3*8*16 = 384, norms 2*8 = 16; final norm 8 -> 600
#   decoder layer: q,k,v,o 4*4 each = 64, mlp 3*4*8 = 96, norms 8; final norm 4 -> 172
#   depth weights: codebook0 head 5*8 = 40, projection 8*4 = 32, then 3 decoder passes (positions 0, 1, 2:
#   3 * 172 = 516) and 2 head slices 4*5 -> 628
#   depth per stream: 2 depth inputs (projected embedding rows) of 4 = 8; decoder KV over 1 + 2 + 3 = 6
#   positions: 2*1*4*6 = 48 -> 56
#   backbone per stream at 10 cached positions: 3 embedding rows of 8 = 24, KV 2*1*4*10 = 80 -> 104
BACKBONE, DECODER, DEPTH_WEIGHTS, DEPTH_PER_STREAM = 600, 172, 628, 56


def test_parameter_counts_match_the_model():
    with torch.device("meta"):
        model = CSMModel(CFG)
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert count("backbone.") == BACKBONE and count("decoder.") == DECODER
    assert 40 + model.projection.weight.numel() + 3 * DECODER + 2 * model.audio_head[0].numel() == DEPTH_WEIGHTS


def test_frame_bytes_by_hand():
    assert floors.frame_bytes(CFG, kv_len=10, dtype_bytes=2) == (600 + 104 + 628 + 56) * 2 == 2776
    # weights are read once for the batch, the KV and embedding rows once per stream
    assert floors.frame_bytes(CFG, kv_len=10, dtype_bytes=2, streams=4) == (600 + 4 * 104 + 628 + 4 * 56) * 2


def test_first_audio_bytes_by_hand():
    # 5 text rows (1 embedding each) + 2 audio rows (3 each) = 11 rows of 8; KV over 7 positions: 2*4*7 = 56
    prefill = 600 + 11 * 8 + 56
    assert floors.first_audio_bytes(CFG, text_rows=5, audio_rows=2, dtype_bytes=2, mimi_bytes=100) == \
        (prefill + DEPTH_WEIGHTS + DEPTH_PER_STREAM) * 2 + 100 == 2956


def test_prefill_flops_by_hand():
    # 576 matmul weights (600 less 24 norm weights) * 2 FLOPs * 4 positions; attention per head:
    # QK^T and PV over 1+2+3+4 = 10 query-key pairs of 4 dims, 2 FLOPs each: 2 * 10 * 4 * 2 = 160, 2 heads
    assert floors.prefill_flops(CFG, positions=4) == 2 * 4 * 576 + 2 * 160 == 4928


def test_mimi_decode_bytes_counts_only_the_decode_path():
    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.encoder_transformer = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
            self.decoder = torch.nn.Linear(2, 2, bias=False)
            self.decoder_transformer = torch.nn.Linear(2, 1, bias=False)

    codec = type("Codec", (), {"mimi": Fake()})()
    assert floors.mimi_decode_bytes(codec) == (4 + 2) * 4


def test_measured_rates_are_positive():
    assert floors.copy_bandwidth("cpu", nbytes=2**20, repeats=2) > 0
    assert floors.matmul_flops("cpu", torch.float32, n=64, repeats=2) > 0
