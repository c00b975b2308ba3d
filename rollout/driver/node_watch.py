"""The cluster's nodes as the console tells them: a node lost or joined during the run is one line.

Ray marks a node dead some seconds after its raylet stops answering; the actors on it then fail or
restart, each with a message of its own that does not name the node. This thread looks at Ray's node
table every POLL_S and says which node went and what the job does about it.
"""

from __future__ import annotations

import threading

import ray

POLL_S = 5.0


class NodeWatch:
    def __init__(self, log, wait_s: float):
        self.log, self.wait_s = log, wait_s
        self._alive = self._nodes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                alive = self._nodes()
            except Exception:  # noqa: BLE001 - Ray going down under us: the job's own wait reports it
                return
            for node_id in self._alive.keys() - alive.keys():
                print(
                    f"ray: node {self._alive[node_id]} (id {node_id[:8]}) was lost; its actors restart on the "
                    f"nodes left or on a new one, waiting up to ray.node_wait_timeout_s ({self.wait_s:.0f}s)",
                    file=self.log,
                    flush=True,
                )
            for node_id in alive.keys() - self._alive.keys():
                print(f"ray: node {alive[node_id]} (id {node_id[:8]}) joined", file=self.log, flush=True)
            self._alive = alive

    @staticmethod
    def _nodes() -> dict[str, str]:
        """The live nodes: id -> address."""
        return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
