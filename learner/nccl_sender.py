"""The learner's end of the GPU weight sync: rank 0 broadcasts each tensor over NCCL into the engines.

The engines' end (`rollout.weight_sync.NcclWeightReceiver`) joins the same group; rank 0 is the learner.
"""

from __future__ import annotations

import torch


def nccl_communicator(host: str, port: int, rank: int, world_size: int, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NcclWeightSender:
    def __init__(self, host: str, port: int, world_size: int, device: torch.device):
        self.comm = nccl_communicator(host, port, 0, world_size, device)
        self.device = device

    @staticmethod
    def specs(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in named]

    def send(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for _, tensor in named:
            self.comm.broadcast(tensor.to(self.device).contiguous(), src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()
