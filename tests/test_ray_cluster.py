"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``): the CPU pool's nodes
come from the cluster, executors are pinned to their nodes, and a trajectory's actions
all run on the node it was pinned to."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

import tangram.ray as tr
from tangram.executors import Command
from tangram.executors.sandbox import isolation_problem
from tangram.spec import Action


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=1, resources={"sandbox_node": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    pool = tr.cpu_pool_from_ray(resource="sandbox_node", memory_gb=4)
    root = str(tmp_path_factory.mktemp("sandboxes"))
    tr.start_broker(
        {"pools": {"cpu": pool}},
        detached=False,
        sandbox_root=root,
        sandbox_isolate=isolation_problem() is None,
    )
    yield [w.node_id for w in workers]
    tr.stop_broker()
    ray.shutdown()
    c.shutdown()


def test_pool_nodes_are_the_ray_nodes(cluster: list[str]):
    pool = tr.cpu_pool_from_ray(resource="sandbox_node")
    assert sorted(n["name"] for n in pool["nodes"]) == sorted(cluster)
    assert all(n["cores"] == 1 for n in pool["nodes"])
    with pytest.raises(ValueError, match="no alive Ray node with resource 'gpu_node'"):
        tr.cpu_pool_from_ray(resource="gpu_node")


async def test_trajectories_stay_on_their_nodes_and_executors(cluster: list[str]):
    client = tr.Client()
    probe = "echo $PPID"

    async def trajectory(name: str) -> list[Any]:
        # 3 GB of each node's 4: the second trajectory cannot share the first one's node.
        out = []
        for _ in range(3):
            act = Action.build(name, {"cpu": 1}, memory_gb=3)
            out.append(await client.run(act, Command(probe)))
        return out

    a, b = await asyncio.gather(trajectory("traj-a"), trajectory("traj-b"))
    for results in (a, b):
        nodes = {r.extra["ray_node"] for r in results}
        assert len(nodes) == 1  # every action where the trajectory was pinned
        assert {r.node for r in results} == nodes  # the pool node is that Ray node
        assert all(r.ok for r in results)
    node_a, node_b = a[0].extra["ray_node"], b[0].extra["ray_node"]
    assert node_a != node_b and {node_a, node_b} == set(cluster)
    assert a[0].extra["executor_pid"] != b[0].extra["executor_pid"]
    for name, node in (("traj-a", node_a), ("traj-b", node_b)):
        executor = tr.find_executor("tangram", "tangram", "sandbox", "cpu", node)
        info = await executor.info.remote()
        assert info["ray_node"] == node
        assert name in await executor.trajectories.remote()
        await client.close_trajectory(name)
        assert name not in await executor.trajectories.remote()
    await client.aclose()
