"""How far quantised weights move the logits and the greedy codes, on seeded random weights
(a script, never a test):

    python -m misotts.bench.quant_accuracy [--preset csm-1b] [--frames 50] [--schemes int8 fp8 int4]

Every variant runs the plain model (the reference path) teacher-forced on one shared history:
the prompt, then `--frames` frames of seeded random codes (on random weights no history is more
typical than another).  So frame t's 32 logit vectors, and their argmax (the greedy code), are
each model's answer to the same question, and a disagreement does not change later questions.
Weights: the preset drawn in bfloat16 (a checkpoint's dtype), the float32 model being the same
values upcast.  Rows:

- bf16 vs fp32: the reference path's own rounding, the yardstick;
- int8 / fp8 / int4 (in a bf16 model, dequantise-then-bf16 math) vs bf16;
- int8 in an fp32 model (the CPU's int8 GEMM, bf16 activations) vs fp32.

Logit error: max |logit - baseline| / max |baseline logit| over a frame's 32 codebooks, for the
first frame, the worst of the first 3, and the worst of all; agreement: the fraction of the
frames x 32 greedy codes equal to the baseline's.
"""
from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from misotts.runtime.config import PRESETS
from misotts.runtime.prompt import build_prompt
from misotts.runtime.tokenizer import ByteTokenizer
from misotts.weights import random_model
from misotts.weights.quantize import SCHEMES, quantize_model


@torch.inference_mode()
def teacher_forced_logits(model, frames, mask, codes) -> torch.Tensor:
    """The model's fp32 logits [T, 32, V] for frames codes [T, 32] after the prompt rows."""
    n, t = model.config.num_codebooks, codes.shape[0]
    audio_rows = torch.cat([codes, torch.zeros(t, 1, dtype=codes.dtype)], 1)
    audio_mask = torch.ones(t, n + 1, dtype=torch.bool)
    audio_mask[:, -1] = False
    rows, row_mask = torch.cat([frames, audio_rows[:-1]]), torch.cat([mask, audio_mask[:-1]])
    model.setup_caches(1, rows.shape[0])
    h = model.backbone_forward(rows[None], row_mask[None], torch.arange(rows.shape[0]))[0, frames.shape[0] - 1:]
    c0 = model.codebook0_head(h).float()
    rest = model.depth_logits(h, codes).float()  # [T, 31, V] for codebooks 1..31
    return torch.cat([c0[:, None], rest], 1)


def compare(logits: torch.Tensor, baseline: torch.Tensor) -> dict:
    per_frame = (logits - baseline).abs().amax((1, 2)) / baseline.abs().amax((1, 2))
    return {"first_frame": per_frame[0].item(), "first_3": per_frame[:3].max().item(),
            "worst": per_frame.max().item(),
            "agreement": (logits.argmax(-1) == baseline.argmax(-1)).float().mean().item()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m misotts.bench.quant_accuracy",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="csm-1b", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    config = PRESETS[args.preset]
    frames, mask = build_prompt("How far do quantised weights move the codes?", 0, [],
                                ByteTokenizer(config.bos_id, config.eos_id), config.num_codebooks)
    codes = torch.randint(0, 2048, (args.frames, config.num_codebooks), generator=torch.Generator().manual_seed(1))

    def draw(weights=None):
        return random_model(config, seed=args.seed, dtype=torch.bfloat16, weights=weights)

    def run(model):
        out = teacher_forced_logits(model, frames, mask, codes)
        del model
        gc.collect()
        return out

    rows = {}
    fp32 = run(draw().float())  # the same values, upcast
    rows["int8 (fp32 model, CPU int8 GEMM) vs fp32"] = compare(run(quantize_model(draw().float(), "int8")), fp32)
    bf16 = run(draw())
    rows["bf16 vs fp32 (yardstick)"] = compare(bf16, fp32)
    for scheme in args.schemes:
        rows[f"{scheme} (bf16 model) vs bf16"] = compare(run(draw(scheme)), bf16)
    print(f"\n{args.preset}, seeded random weights, {args.frames} teacher-forced frames x 32 codebooks\n")
    print("| variant | logit error, frame 0 | first 3 frames | all frames | greedy codes agreeing |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['first_frame']:.2e} | {r['first_3']:.2e} | {r['worst']:.2e} | {r['agreement']:.1%} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"preset": args.preset, "frames": args.frames, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
