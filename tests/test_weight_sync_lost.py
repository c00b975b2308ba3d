"""Weights lost on the way: the node holding a sync's weights (in the object store, with the learner rank
that exported them) dies before the engines have fetched them. On a two-node Ray cluster in this machine
(`ray.cluster_utils.Cluster`), whose second node is removed as a lost machine would be."""

import pytest
import ray
from ray.cluster_utils import Cluster
from test_weight_sync import release, two_worker_pool

from rollout.weight_sync.check import PROBE_IDS

pytestmark = [pytest.mark.vllm, pytest.mark.cluster]


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def two_nodes(cluster):
    """The cluster, and a second node (each test's own) that holds the weights and is lost."""
    return cluster, cluster.add_node(num_cpus=0, resources={"doomed": 1})


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


def test_weights_lost_with_the_learners_ranks_come_from_the_rebuilt_learner_to_every_engine(two_nodes, tmp_path, capfd):
    """The learner's rank was on the lost node too: reading its weights again finds it dead, so it is rebuilt
    (from the start model: no checkpoint yet) in the middle of the reload, and the engines load the rebuilt
    learner's weights. (Neither engine had loaded the lost ones here; where one had, it loads again too.)"""
    cluster, doomed = two_nodes
    pool, learner, sync = two_worker_pool(tmp_path, "rollout.weight_sync=object_store")
    try:
        [ref] = ray.get(Holder.remote().hold.remote(learner.weights_ref()), timeout=120)
        sync.probe.expect(0, learner.probe_logprobs(list(PROBE_IDS)))
        ray.kill(learner.handles[0], no_restart=True)  # lost with the node, as if it had been on it
        cluster.remove_node(doomed)
        sync.queue_weights(1, ref)
        sync.confirm()
        assert learner.restarts == 1
        assert sync.version == 0 and [pool.serving(name, 60) for name in pool.names] == [0, 0]
        assert sync.gap < 1e-4
        err = capfd.readouterr().err
        assert "weights version 1 were lost with their node; loading the learner's" in err
        assert "learner: a rank died" in err and "rebuilding it from the start model" in err
    finally:
        release(pool, learner)
