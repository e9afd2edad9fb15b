"""Where a Triton kernel of this package can run, shared by every kernel module."""
from __future__ import annotations

import os

import torch

__all__ = ["available"]


def available(device) -> bool:
    "Whether a Triton kernel can run on `device`: a CUDA device with Triton, or any device under `TRITON_INTERPRET=1`."
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
