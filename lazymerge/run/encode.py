"""A GGUF tensor's bytes from a block of its rows (plan/gguf.py decided how): the
values, exactly as the safetensors output would hold them, to float32, Q and K rows
permuted within each head as llama.cpp's converter does, then encoded in the tensor's
type by write/quants.py (llama.cpp's reference bytes)."""

from __future__ import annotations

import numpy as np
import torch

from lazymerge.plan.model import Encoding


def encode_rows(rows: torch.Tensor, e: Encoding, head_rows: int) -> np.ndarray:
    """Bytes of `rows` (a block starting at a multiple of `head_rows` when permuted)."""
    from lazymerge.write.quants import encode  # gguf-py: only a GGUF merge needs it

    x = rows.reshape(rows.shape[0], -1).to(torch.float32)
    if e.heads:
        x = permute_heads(x, head_rows)
    data: np.ndarray = encode(np.ascontiguousarray(x.numpy()), e.qtype)
    return data


def permute_heads(x: torch.Tensor, head_rows: int) -> torch.Tensor:
    """llama.cpp's rotary layout: within each head, the rows of its first half and its
    second half interleaved (row i of the half a -> 2i + a). Its converter undoes the
    permutation Hugging Face's conversion applied to the original Llama weights."""
    half = head_rows // 2
    return x.reshape(-1, 2, half, x.shape[-1]).transpose(1, 2).reshape(x.shape)
