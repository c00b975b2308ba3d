"""GPU weight sync: the learner broadcasts new weights over NCCL straight into the vLLM workers.

`NcclWeightReceiver` is mixed into vLLM's GPU worker (`worker_extension_cls`), so its methods run
inside every engine process through `LLM.collective_rpc`; `NcclWeightSender` is the learner's end.
Rank 0 of the group is the learner, the engines' tensor-parallel ranks follow. Only GPU clusters use
this path (NCCL needs CUDA); CPU engines reload through `VLLMEngine.reload_weights` instead.
"""

from __future__ import annotations

import torch


def _communicator(host: str, port: int, rank: int, world_size: int, device):
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NcclWeightReceiver:
    """Methods added to each vLLM GPU worker; `self` is the worker (it has `device`, `model_runner`)."""

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        self._weight_comm = _communicator(host, port, rank, world_size, self.device)

    def receive_weights(self, specs: list[tuple[str, str, tuple[int, ...]]]) -> None:
        """Receive each (name, dtype, shape) broadcast by the learner, in order, then load them."""
        weights = []
        for name, dtype, shape in specs:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._weight_comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            weights.append((name, tensor))
        torch.cuda.synchronize()
        # On GPU vLLM keeps checkpoint-shaped parameters, so the model's own loader applies them.
        self.model_runner.model.load_weights(weights=weights)


class NcclWeightSender:
    """The learner's end of the group (rank 0)."""

    def __init__(self, host: str, port: int, world_size: int, device: torch.device):
        self.comm = _communicator(host, port, 0, world_size, device)

    @staticmethod
    def specs(named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in named]

    def send(self, named: list[tuple[str, torch.Tensor]]) -> None:
        for _, tensor in named:
            self.comm.broadcast(tensor.contiguous(), src=0, stream=torch.cuda.current_stream())
        torch.cuda.synchronize()
