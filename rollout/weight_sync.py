"""GPU weight sync: the learner broadcasts new weights over NCCL straight into the vLLM workers.

`NcclWeightReceiver` is mixed into vLLM's GPU worker (`worker_extension_cls`), so its methods run
inside every engine process through `LLM.collective_rpc`; `learner.nccl_sender` is the learner's end.
Rank 0 of the group is the learner, the engines' tensor-parallel ranks follow. Only GPU clusters use
this path (NCCL needs CUDA); CPU engines reload through `VLLMEngine.reload_weights` instead.
"""

from __future__ import annotations

import torch

from learner.nccl_sender import nccl_communicator


class NcclWeightReceiver:
    """Methods added to each vLLM GPU worker; `self` is the worker (it has `device`, `model_runner`)."""

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        self._weight_comm = nccl_communicator(host, port, rank, world_size, self.device)

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
