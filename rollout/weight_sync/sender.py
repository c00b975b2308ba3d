"""The learner's end of the collective weight sync: rank 0 of the learner sends, every rank gathers.

It runs beside the `Learner` inside each learner rank's actor (rollout/actors/learner_ranks.py) and
reads only what the learner exports: `export_weights` (a collective when sharded) and their shapes
(`weight_shapes`: merged weights under LoRA), so the learner itself knows nothing of engines or of how
weights travel.
"""

from __future__ import annotations

from rollout.weight_sync.wire import GroupAddress, SyncPlan, WeightGroup, open_weight_group, plan_buckets


class WeightSender:
    def __init__(self, learner):
        self.learner = learner
        self.group: WeightGroup | None = None

    def plan(self, dtype: str, bucket_bytes: int) -> SyncPlan:
        """The buckets of every sync (the shapes never change); a tied head is sent once, as the embedding."""
        learner = self.learner
        shapes = [
            (name, shape)
            for name, shape in learner.weight_shapes()
            if not (learner.tied_head and name == "lm_head.weight")
        ]
        tied = ()
        if learner.tied_head:
            embedding = learner.policy.lm.get_input_embeddings().weight
            tied = tuple(("lm_head.weight", name) for name, p in learner.policy.lm.named_parameters() if p is embedding)
        return plan_buckets(shapes, dtype, bucket_bytes, tied)

    def open(self, address: GroupAddress) -> bool:
        """Rank 0 joins the sync group as its sender; False if the driver called the group off."""
        self.group = None
        if self.learner.rank != 0:
            return True
        self.group = open_weight_group(address, 0, self.learner.device)
        return self.group is not None

    def broadcast(self, plan: SyncPlan, sync: int) -> bool:
        """Rank 0 sends the weights once every engine has arrived, one tensor at a time from the device it
        trains on into the buckets there (a sharded tensor gathered as it comes: every rank iterates, in
        step). False if the driver called the sync off before it began."""
        weights = self.learner.named_weights()
        sending = self.learner.rank == 0 and self.group is not None and self.group.ready(sync)
        if sending:
            self.group.send(plan, weights)
        else:
            for _ in weights:  # the gathers are collectives: the other ranks take part in each
                pass
        return sending or self.learner.rank != 0
