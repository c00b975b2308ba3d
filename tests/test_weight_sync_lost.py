"""Weights lost on the way: the node holding a sync's weights (in the object store, with the learner rank
that exported them) dies before the engines have fetched them. On a two-node Ray cluster in this machine
(`ray.cluster_utils.Cluster`), whose second node is removed as a lost machine would be."""

import pytest
import ray
from ray.cluster_utils import Cluster
from test_weight_sync import release, two_worker_pool

from rollout.weight_sync.check import PROBE_IDS

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=0, resources={"doomed": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, doomed
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_cpus=0, resources={"doomed": 1})
class Holder:
    """Keeps a copy of the weights it is given in its node's object store (`ray.put` there)."""

    def hold(self, weights):
        return [ray.put(weights)]  # in a list: the caller gets the reference, not the weights


def test_weights_lost_with_their_node_before_the_engines_loaded_them_come_from_the_learner_again(
    two_nodes, tmp_path, capfd
):
    cluster, doomed = two_nodes
    pool, learner, sync = two_worker_pool(tmp_path, "rollout.weight_sync=object_store")
    try:
        [ref] = ray.get(Holder.remote().hold.remote(learner.weights_ref()), timeout=120)
        cluster.remove_node(doomed)  # the weights, and their owner, gone with the node
        # The learner's ranks have made no update: their weights, read back with their version, are version 0.
        sync.probe.expect(0, learner.probe_logprobs(list(PROBE_IDS)))  # as `queue` does
        sync.queue_weights(1, ref)
        sync.confirm()
        assert sync.version == 0 and [pool.serving(name, 60) for name in pool.names] == [0, 0]
        assert sync.gap < 1e-4  # the learner's weights, not the other ones the engines started from
        err = capfd.readouterr().err
        assert "rollout-0, rollout-1: weights version 1 were lost with their node; loading the learner's" in err
    finally:
        release(pool, learner)
