"""SkyRL-Gym environments with a Tangram trajectory: ``TangramTextEnv``.

A subclass of SkyRL-Gym's ``BaseTextEnv`` that gives each environment instance (one
rollout in SkyRL's generator) a Tangram trajectory id, leases its tool calls from the
broker actor through one ``tangram.ray.SyncClient`` shared by every environment of the
process, and closes the trajectory on the broker in ``close()``, so its pinned node and
memory are freed at once instead of after the broker's idle timeout.

    from tangram.integrations.skyrl import TangramTextEnv

    class SandboxEnv(TangramTextEnv):
        def step(self, action):
            with self.leased({"sandbox": 1}, timeout=60) as lease:
                out = run_tool(action, lease)
            return {"observations": [...], "reward": 0.0, "done": False, "metadata": {}}

SkyRL's generator steps many environments at once from a ``ThreadPoolExecutor``; each
environment is stepped by one thread at a time and the shared ``SyncClient`` is
thread-safe, so no locking is needed in the environment. ``TangramTextEnv`` defines no
``__init__``: it can be mixed in before an existing environment
(``class MyEnv(TangramTextEnv, SearchEnv)``) and its constructor runs unchanged.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from skyrl_gym.envs.base_text_env import BaseTextEnv

from tangram.leasing import SyncLeaseContext
from tangram.ray.sync import SyncClient
from tangram.spec import Action, Lease

__all__ = ["TangramTextEnv", "shared_client"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_shared: SyncClient | None = None
_shared_lock = threading.Lock()


def shared_client(broker: Any = None, **kwargs: Any) -> SyncClient:
    """The process's one ``SyncClient`` (to the named broker actor of the current Ray
    cluster by default), made on first use and again if it was closed; ``broker`` and
    ``kwargs`` (``SyncClient``'s) apply only when it is made."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = SyncClient(broker, **kwargs)
        return _shared


class TangramTextEnv(BaseTextEnv):  # type: ignore[misc]
    """A ``BaseTextEnv`` whose tool calls are leased under one Tangram trajectory.

    ``tangram_client``: the ``SyncClient`` to lease from; set it on the class (or the
    instance) to choose one, else ``shared_client()`` is used. ``trajectory``: this
    environment's trajectory id, a fresh ``skyrl-<uuid>`` unless assigned (in
    ``__init__``, say from the sample's ``extras``)."""

    tangram_client: SyncClient | None = None

    @property
    def trajectory(self) -> str:
        # setdefault: atomic, so two threads never see two ids.
        made = f"skyrl-{uuid.uuid4().hex}"
        return str(self.__dict__.setdefault("_tangram_trajectory", made))

    @trajectory.setter
    def trajectory(self, value: str) -> None:
        self.__dict__["_tangram_trajectory"] = str(value)

    def _tangram(self) -> SyncClient:
        client = self.tangram_client
        return client if client is not None else shared_client()

    def leased(
        self, demands: Mapping[str, Any], *, timeout: float | None = None, **action: Any
    ) -> SyncLeaseContext[Action, Lease]:
        """``with env.leased({"cpu": 1}) as lease:``: an action of this trajectory
        demanding ``demands`` (``action``: more of ``Action.build``'s fields, such as
        ``tokens`` or ``task``), held while the block runs and released after it
        (``outcome="error"`` if it raised). Keep the context to report usage:
        ``ctx = env.leased(...)``, then ``ctx.report(tokens=n)`` inside the block."""
        self.__dict__["_tangram_used"] = True
        return self._tangram().lease(
            Action.build(self.trajectory, demands, **action), timeout=timeout
        )

    def call(
        self,
        fn: Callable[[], T],
        demands: Mapping[str, Any],
        *,
        timeout: float | None = None,
        **action: Any,
    ) -> T:
        """``fn()`` under a lease of ``demands`` (as ``leased``): its result."""
        with self.leased(demands, timeout=timeout, **action):
            return fn()

    def close(self) -> None:
        """Close the trajectory on the broker (its pinned node and memory are freed, its
        queued actions cancelled), then ``BaseTextEnv.close``. A broker that cannot be reached
        is logged, not raised: its idle timeout frees the trajectory later."""
        if self.__dict__.pop("_tangram_used", False):
            try:
                self._tangram().close_trajectory(self.trajectory)
            except Exception as exc:
                log.warning("Tangram trajectory %s not closed: %s", self.trajectory, exc)
        super().close()
