"""Triton kernels for the MisoTTS runtime (see docs/kernels.md).

Modules (import them directly; nothing is imported here so `import misotts.kernels.rng` stays cheap):
  rng              shared counter RNG (torch + Triton twins)
  reference        torch references / CPU path
  embedding        rvq_embed
  rope             rope_kv_write, llama3_inv_freq
  paged_attention  paged_decode, decode_workspace, paged_prefill
  rmsnorm          rmsnorm (optionally fused with the residual add)
  swiglu           swiglu
  sampling         sample_topk, depth_step, sample_next_input
  norm_linear      norm_linear (RMSNorm + GEMV [+ SwiGLU]), linear_add (GEMV + residual)
  depth_attention  depth_attention (a depth layer's RoPE + KV write + attention + wo + residual)
  specs            one spec per kernel: launcher, reference, shape cases, tolerances
  report           ahead-of-time compile report (python -m misotts.kernels.report)
"""
