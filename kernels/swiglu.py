"""SwiGLU activation on a fused gate_up projection output."""
import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check, check_same_device, launch


@triton.jit
def _swiglu_kernel(gate_up, out, ffn, stride_in, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < ffn
    gate = tl.load(gate_up + row * stride_in + cols, mask=keep, other=0.0).to(tl.float32)
    up = tl.load(gate_up + row * stride_in + ffn + cols, mask=keep, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up
    tl.store(out + row * stride_out + cols, act.to(out.dtype.element_ty), mask=keep)


def swiglu(gate_up, out=None):
    """silu(gate) * up, fp32 math.

    gate_up: [..., 2F] fused projection output, gate in [..., :F] and up in [..., F:];
             rows may be strided, the last dim must be contiguous.
    out:     optional [..., F] of the same dtype (rows may be strided). Returns out.
    """
    check("gate_up", gate_up, dtypes=FLOAT_DTYPES, last_contiguous=True)
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate then up), got shape {list(gate_up.shape)}")
    ffn = gate_up.shape[-1] // 2
    rows_in = gate_up.reshape(-1, 2 * ffn) if gate_up.dim() != 2 else gate_up
    if out is None:
        out = torch.empty(*gate_up.shape[:-1], ffn, dtype=gate_up.dtype, device=gate_up.device)
    check("out", out, shape=(*gate_up.shape[:-1], ffn), dtypes=(gate_up.dtype,), last_contiguous=True)
    rows_out = out.view(-1, ffn) if out.dim() != 2 else out
    check_same_device(gate_up=gate_up, out=out)
    block = 1024
    grid = (rows_in.shape[0], triton.cdiv(ffn, block))
    launch(_swiglu_kernel, grid, rows_in, rows_out, ffn, rows_in.stride(0), rows_out.stride(0),
           BLOCK=block, num_warps=4)
    return out
