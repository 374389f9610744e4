"""The Triton op set for quantised weights: `TritonOps` where a weight is a tensor; where it is a
`QuantLinear`, the quantised GEMVs of `misotts.kernels.quant_linear` for decode rows (norm + qkv,
norm + gate_up + SwiGLU, down + residual) and, for prefill rows, the weight dequantised for the
dense path.  The depth attention kernel fuses its wo, so a quantised wo is dequantised for it
(the decoder's wo is 1-2 MB).  Chosen by `make_ops("triton", ..., quantized=True)`; "auto" keeps
quantised models on the torch op set until this one has been run on a GPU.
"""
from __future__ import annotations

import torch.nn.functional as F

from misotts.kernels import reference as ref
from misotts.weights.quantize import QuantLinear

from .ops import TritonOps


class QuantTritonOps(TritonOps):
    name = "triton (quantised weights)"

    def __init__(self):
        super().__init__()
        from misotts.kernels import quant_linear

        self.k_quant = quant_linear

    def _decode(self, x) -> bool:
        return x.shape[0] <= self.fused_rows

    def norm_linear(self, x, norm_weight, eps, weight):
        if not isinstance(weight, QuantLinear):
            return super().norm_linear(x, norm_weight, eps, weight)
        if self._decode(x):
            return self.k_quant.quant_norm_linear(x, norm_weight, eps, weight.weight, weight.weight_scale,
                                                  weight.scheme)
        return F.linear(ref.rmsnorm_ref(x, norm_weight, eps)[0], weight.dequantize(x.dtype))

    def norm_swiglu(self, x, norm_weight, eps, gate_up):
        if not isinstance(gate_up, QuantLinear):
            return super().norm_swiglu(x, norm_weight, eps, gate_up)
        if self._decode(x):
            return self.k_quant.quant_norm_linear(x, norm_weight, eps, gate_up.weight, gate_up.weight_scale,
                                                  gate_up.scheme, swiglu=True)
        return ref.swiglu_ref(F.linear(ref.rmsnorm_ref(x, norm_weight, eps)[0], gate_up.dequantize(x.dtype)))

    def linear_add(self, a, weight, residual):
        """residual += a @ weight.T, in place (as TritonOps.linear_add)."""
        if not isinstance(weight, QuantLinear):
            return super().linear_add(a, weight, residual)
        if self._decode(a):
            return self.k_quant.quant_linear_add(a, weight.weight, weight.weight_scale, weight.scheme, residual)
        return residual.copy_(ref.linear_residual_ref(a, weight.dequantize(a.dtype), residual))

    def depth_attention(self, qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual):
        if isinstance(wo, QuantLinear):
            wo = wo.dequantize(qkv.dtype)
        return super().depth_attention(qkv, cfg, k_cache, v_cache, pos, cos, sin, allowed, wo, residual)
