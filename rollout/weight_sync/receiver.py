"""The engines' end of the collective weight sync, mixed into every vLLM worker (`worker_extension_cls`).

Its methods run inside each engine process through `LLM.collective_rpc`: the worker joins the sync
group (`wire.open_weight_group`) as one more rank per tensor-parallel shard, and loads each bucket
as it arrives through the worker's own `reload_weights`, which re-runs vLLM's post-load processing
(on CPU, vLLM repacks weights after loading: a plain `load_weights` would write into tensors the
kernels no longer read). Loading from a stream keeps one bucket, not a second copy of the model.
"""

from __future__ import annotations

from rollout.weight_sync.wire import GroupAddress, SyncPlan, open_weight_group


class WeightReceiver:
    """Methods added to each vLLM worker; `self` is the worker (it has `device` and `reload_weights`)."""

    def open_weight_group(self, address: GroupAddress, rank_offset: int) -> bool:
        """Join the group as rank `rank_offset` + this worker's tensor-parallel rank; False if called off."""
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        self._weight_group = open_weight_group(address, rank_offset + get_tensor_model_parallel_rank(), self.device)
        return self._weight_group is not None

    def receive_weights(self, plan: SyncPlan, sync: int) -> bool:
        """Receive sync number `sync` and load it bucket by bucket; False if the driver called it off."""
        if self._weight_group is None or not self._weight_group.ready(sync):
            return False
        # From here the reload has taken the model's layers apart: a failed bucket leaves the engine
        # unusable, and the error goes up (the driver names this worker and fails the sync).
        self.reload_weights(weights_iterator=self._weight_group.receive(plan))
        return True
