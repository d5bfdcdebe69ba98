"""GlobalOps backed by torch.distributed: what makes the clustering math data-parallel.

Inside a Ray Train worker the process group is already set up (gloo on CPU, nccl on GPU);
collectives run on the group's device (CUDA for nccl) and results come back on the caller's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raymmc.cluster.base import GlobalOps


class TorchDistributedOps(GlobalOps):
    def __init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistributedOps needs an initialised torch.distributed process group")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # nccl only moves CUDA tensors; gloo moves CPU tensors.
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def all_reduce_sum_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        # on the group's device (nccl: CUDA); the autograd all_reduce sums the gradients in its backward
        return all_reduce(tensor.to(self.device), op=dist.ReduceOp.SUM).to(tensor.device)

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order; sizes may differ."""
        local = tensor.detach().to(self.device).contiguous()
        n = torch.tensor([local.shape[0]], device=self.device, dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        # all_gather needs equal shapes: pad to the longest, trim after.
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = tensor.detach().to(self.device, copy=True)
        dist.broadcast(out, src=src)
        return out.to(tensor.device)

    def barrier(self) -> None:
        dist.barrier()
