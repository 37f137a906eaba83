"""GPU memory available to a new allocation."""
from __future__ import annotations

from typing import Any


def cuda_free_bytes(device: Any) -> int:
    """Bytes a new tensor on CUDA ``device`` can take: the driver's free memory plus what torch's
    caching allocator holds reserved but unused (it hands that out before asking the driver)."""
    import torch

    device = torch.device(device)
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
