"""The broker as a Ray actor: one ``Broker`` (and so one core) behind an async actor.

Clients talk to it with ``exchange``: one call carries a batch of submissions, releases,
heartbeats and cancellations from one client and brings back every grant that client
has waiting, so a client with many concurrent actions makes a handful of Ray calls per
scheduling round instead of several per action. Errors travel as values (the name
tangram/errors.py's table gives the class, and the message) so each caller gets the
precise ``TangramError`` back.

An HTTP app can be served from the same actor (``serve_http``): it runs on the actor's
event loop and is handed this very ``Broker``, so whichever door a request uses there is
one broker state.

With a data directory the broker journals to SQLite there, and a life of the actor that
Ray restarts (it re-runs the constructor with the same arguments) restores every live
lease and every queued action of the previous one. ``exchange`` is idempotent by action
id, so a client that sees a new life (``Reply``'s last element) submits what it still
waits for again and gets the restored action's grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
from collections.abc import Callable
from typing import Any

from tangram.broker import Broker
from tangram.config import Config
from tangram.core.state import IdleClose
from tangram.errors import name_of
from tangram.executors.fencing import GrantSigner, SignedGrant
from tangram.leasing import ABANDONED
from tangram.spec import Action, Lease, TangramError, Unavailable
from tangram.wire import grant_out

# A grant as it travels: tangram.wire.grant_out's named, versioned dict (lease id,
# fencing token, allocation, ttl, key pool, and the signed grant the executors check or
# None). The client rebuilds the Lease around its own Action, so the action is not sent.
LeaseWire = dict[str, Any]
# (action id, grant or None, error class name or None, error message or None)
Delivery = tuple[str, LeaseWire | None, str | None, str | None]
# (lease id, error class name or None, message or None)
Outcome = tuple[str, str | None, str | None]
# (lease id, the grant re-signed with the expiry a heartbeat gave it)
Refresh = tuple[str, SignedGrant]
# (grants, releases, failed heartbeats, refreshed grants of successful heartbeats, the
# actor's life: a new value after every restart, so clients know to submit again)
Reply = tuple[list[Delivery], list[Outcome], list[Outcome], list[Refresh], int]

LONG_POLL_MAX = 5.0  # the longest a client's poll waits before it asks again
# The default data directory: {session} is the Ray session directory of the node the
# actor runs on (/tmp/ray/session_...), so a journal belongs to one Ray cluster.
DEFAULT_DATA_DIR = "{session}/tangram/{namespace}/{name}"


def data_path(template: str, name: str, namespace: str) -> str:
    """``template`` with ``{session}``, ``{namespace}`` and ``{name}`` filled in, on the
    node this runs on."""
    if "{session}" in template:
        import ray  # the actor runs under Ray; the module itself does not need it

        ctx = ray.get_runtime_context()
        session = os.path.join(ctx.get_temp_dir(), ctx.get_session_name())
        template = template.replace("{session}", session)
    return template.replace("{namespace}", namespace).replace("{name}", name)


class BrokerActor:
    """Wrapped with ``ray.remote`` by ``tangram.ray.start_broker``; plain to test."""

    def __init__(
        self,
        config: Config,
        *,
        name: str = "tangram",
        namespace: str = "tangram",
        fencing_key: bytes | None = None,
        data_dir: str | None = None,
    ):
        self.config = config
        self.name = name
        self.namespace = namespace
        # A new value in every life (nanoseconds at start): clients compare it.
        self.life = time.time_ns()
        self.data_dir = None if data_dir is None else data_path(data_dir, name, namespace)
        self.broker = Broker.from_config(
            config,
            data_dir=self.data_dir,
            signer=GrantSigner(fencing_key) if fencing_key is not None else None,
        )
        # Without a journal a restarted actor starts empty and its fencing counter at 1,
        # below tokens the executors have already seen: they would refuse every new
        # lease as stale. With one, the counter continues above every token the journal
        # recorded, but a restart may still open another journal than the last life
        # wrote: Ray can restart the actor on another node, where the directory is
        # fresh (or holds an older life's journal). Starting no lower than the wall clock
        # in microseconds keeps tokens above those of any earlier life in every case
        # (unless the clock goes back, or a life issued over a million tokens a second).
        self.broker.core.resume(time.time_ns() // 1000, 0)
        # Actions restored from the journal that no client has claimed yet in this life
        # (the client that submitted them is unknown until it submits again).
        self._unclaimed: set[str] = set()
        # action id -> the client that submitted or claimed it in this life: a submit of
        # a live action id attaches only for that client (others get duplicate_id).
        self._owner: dict[str, str] = {}
        self._adopted = False
        with contextlib.suppress(RuntimeError):  # no running loop: the first call does it
            self._adopt()
        self._inbox: dict[str, list[Delivery]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._gone: set[str] = set()  # clients that said goodbye: grants go back
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()
        self.broker.subscribe(self._on_broker_event)

    def _on_broker_event(self, kind: str, obj: Any) -> None:
        if kind == "idle_close":  # nobody closed it: its sandbox directories go too
            assert isinstance(obj, IdleClose)
            task = asyncio.get_running_loop().create_task(
                self._remove_workdirs(obj.trajectory, list(obj.pinned.items()))
            )
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _remove_workdirs(self, trajectory: str, pinned: list[tuple[str, str]]) -> None:
        """Remove the trajectory's sandbox working directory on each node it was pinned
        to (a dead executor has none to remove)."""
        from tangram.ray.executors import find_executor  # beside ray, not at import time

        for pool, node in pinned:
            handle = find_executor(self.name, self.namespace, "sandbox", pool, node)
            if handle is not None:
                with contextlib.suppress(Exception):
                    await handle.close_trajectory.remote(trajectory)

    # ------------------------------------------------------------------ introspection
    async def ping(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "pools": self.pools(),
            "pid": os.getpid(),
            "life": self.life,
            "data_dir": self.data_dir,
        }

    async def recovered(self) -> dict[str, list[str]]:
        """What this life took over from the journal: the ids of the leases restored and
        of the actions queued again."""
        return {
            "leases": [x.id for x in self.broker.restored],
            "queued": [a.id for a in self.broker.requeued],
        }

    async def describe(self) -> dict[str, dict[str, Any]]:
        return self.pools()

    def pools(self) -> dict[str, dict[str, Any]]:
        """Pool name -> kind and node names (what a client needs to find executors)."""
        out: dict[str, dict[str, Any]] = {}
        for pool, mgr in self.broker.core.pools.items():
            out[pool] = {"kind": mgr.kind, "nodes": mgr.partitions()}
        return out

    async def snapshot(self) -> dict[str, Any]:
        return self.broker.snapshot()

    async def counters(self, pool: str) -> dict[str, float]:
        """A pool's accounting beyond the snapshot: tokens estimated and reported, GPU
        restores, evictions, cache hits and the current restore cost per service."""
        return self.broker.core.pools[pool].counters()

    # ------------------------------------------------------------------ the batched door
    async def exchange(
        self,
        client: str,
        submits: list[Action],
        releases: list[tuple[str, str, dict[str, Any] | None]],
        beats: list[str],
        cancels: list[str],
        wait: float = 0.0,
        seen: int | None = None,
    ) -> Reply:
        """Apply a client's batch, then return its grants (waiting up to ``wait`` seconds
        for one when it has none, unless ``seen``, the life the client heard from last,
        is an earlier one: it learns of the restart at once).

        With a journal, nothing is acknowledged before it is durable; if the journal
        cannot write, releases and heartbeats of this batch come back failed with
        ``JournalUnavailable`` (they took effect, but a crash may undo them: send them
        again)."""
        broker = self.broker
        self._adopt()
        self._gone.discard(client)
        inbox = self._inbox.setdefault(client, [])
        released: list[Outcome] = []
        for lease_id, outcome, usage in releases:
            try:
                broker.release(lease_id, outcome, usage)
                released.append((lease_id, None, None))
            except TangramError as exc:
                released.append((lease_id, name_of(exc), str(exc)))
        failed: list[Outcome] = []
        refreshed: list[Refresh] = []
        for lease_id in beats:
            try:
                broker.heartbeat(lease_id)
            except TangramError as exc:
                failed.append((lease_id, name_of(exc), str(exc)))
                continue
            lease = broker.core.leases.get(lease_id)
            if lease is not None and lease.grant is not None:
                refreshed.append((lease_id, lease.grant))
        for action_id in cancels:
            self._cancel(action_id)
        for action in submits:
            try:
                self._submit(client, action)
            except TangramError as exc:
                inbox.append((action.id, None, name_of(exc), str(exc)))
        if broker.journal is not None and (submits or releases or beats or cancels):
            try:
                await broker.sync()
            except Unavailable as exc:
                why = (name_of(exc), str(exc))
                released = [(i, *why) if err is None else (i, err, m) for i, err, m in released]
                failed += [(i, *why) for i, _ in refreshed]
                refreshed = []
        self._forget_ended()
        if submits or releases:
            # Let the round this batch triggered run and its grants reach the inbox.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        if not inbox and wait > 0 and seen in (None, self.life):
            event = self._events.get(client)
            if event is None:
                event = self._events[client] = asyncio.Event()
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(wait, LONG_POLL_MAX))
        inbox = self._inbox.get(client, [])
        self._inbox[client] = []
        return inbox, released, failed, refreshed, self.life

    def _adopt(self) -> None:
        """Follow every action restored from the journal (on the running loop): a
        restored action granted before its client submits it again must keep its lease
        for that client, not be given back as abandoned."""
        if self._adopted:
            return
        asyncio.get_running_loop()  # RuntimeError before the actor's loop runs
        self._adopted = True
        for action in self.broker.requeued:
            if self.broker.follow(action.id) is not None:
                self._unclaimed.add(action.id)
        self._unclaimed.update(x.action.id for x in self.broker.restored)

    def _submit(self, client: str, action: Action) -> None:
        """Queue the action, or, if its id is already live for this client or restored
        from the journal, attach to it: a client submits again what it waits for after
        a restart (or a failed call), and gets the one grant, not a second action."""
        broker = self.broker
        aid = action.id
        owner = self._owner.get(aid) if aid else None
        if aid and (owner == client or (owner is None and aid in self._unclaimed)):
            lease_id = broker.core.lease_of.get(aid)
            if lease_id is not None or broker.core.is_queued(aid):
                self._unclaimed.discard(aid)
                self._owner[aid] = client
                if lease_id is not None:
                    # Granted already (its reply was lost, or it was granted after a
                    # restart before its client came back): deliver that lease.
                    self._redeliver(client, aid, broker.core.leases[lease_id])
                elif owner is None:
                    fut = broker.follow(aid)
                    assert fut is not None
                    fut.add_done_callback(self._deliverer(client, aid))
                # else: queued by this client in this life, its deliverer is attached.
                return
        fut = broker.submit_nowait(action)  # a live id of another client: duplicate_id
        self._owner[action.id] = client
        fut.add_done_callback(self._deliverer(client, action.id))

    def _redeliver(self, client: str, action_id: str, lease: Lease) -> None:
        broker = self.broker
        if broker.signer is not None and lease.grant is None:
            broker._sign(lease, broker.clock())  # a restored lease has no signed grant yet
        done: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        done.set_result(lease)
        self._deliverer(client, action_id)(done)

    def _cancel(self, action_id: str) -> None:
        if self.broker.cancel(action_id):  # its waiter resolves with ActionCancelled
            return
        lease_id = self.broker.core.lease_of.get(action_id)
        if lease_id is not None and action_id in self._unclaimed:
            # Granted after a restart to an action whose client has given up before
            # claiming it: nobody else would release it before its TTL.
            self._unclaimed.discard(action_id)
            with contextlib.suppress(TangramError):
                self.broker.release(lease_id, ABANDONED)

    def _forget_ended(self) -> None:
        # Owners of actions that are neither queued nor leased any more, in one pass
        # once there are many, so the map stays as large as what is live.
        core = self.broker.core
        live_now = len(core.leases) + core.queue_length
        if len(self._owner) + len(self._unclaimed) <= 2 * live_now + 4096:
            return
        live = core.lease_of
        self._owner = {a: c for a, c in self._owner.items() if a in live or core.is_queued(a)}
        self._unclaimed = {a for a in self._unclaimed if a in live or core.is_queued(a)}

    def _deliverer(self, client: str, action_id: str) -> Callable[[asyncio.Future[Lease]], None]:
        def deliver(fut: asyncio.Future[Lease]) -> None:
            if fut.cancelled():
                item: Delivery = (action_id, None, "ActionCancelled", "the broker was closed")
            elif (exc := fut.exception()) is not None:
                item = (action_id, None, name_of(exc), str(exc))
            else:
                lease = fut.result()
                if client in self._gone:  # nobody will ever pick it up
                    self.broker.release(lease.id, ABANDONED)
                    return
                item = (action_id, grant_out(lease), None, None)
            self._inbox.setdefault(client, []).append(item)
            event = self._events.get(client)
            if event is not None:
                event.set()

        return deliver

    async def goodbye(self, client: str) -> int:
        """The client is closing: give back grants it never picked up; return how many."""
        self._adopt()
        self._gone.add(client)
        self._events.pop(client, None)
        n = 0
        for _, wire, _, _ in self._inbox.pop(client, []):
            if wire is not None:
                with contextlib.suppress(TangramError):
                    self.broker.release(wire["id"], ABANDONED)
                n += 1
        return n

    # ------------------------------------------------------------------ other operations
    async def why_waiting(self, action_id: str) -> dict[str, Any] | None:
        """Why a queued action waits (``Broker.why_waiting``); None if it is not queued.
        ``ready_at`` is turned into Unix time (the broker's clock is this process's)."""
        why = self.broker.why_waiting(action_id)
        if why is not None and "ready_at" in why:
            why["ready_at"] = why["ready_at"] - self.broker.clock() + time.time()
        return why

    async def overview(self) -> dict[str, Any]:
        """The snapshot with the queue per tenant, the oldest waiters and why, and the
        leases by age (what ``GET /v1/status`` answers)."""
        return self.broker.overview()

    async def pins(self, trajectory: str) -> dict[str, str]:
        """Pool -> the node the trajectory is pinned to (where its sandbox lives)."""
        return {
            pool: node
            for pool, mgr in self.broker.core.pools.items()
            if (node := mgr.pin_of(trajectory)) is not None
        }

    async def close_trajectory(self, trajectory: str) -> int:
        """Close the trajectory in the broker and remove its sandbox working directory
        on the node it was pinned to. Returns how many queued actions were cancelled."""
        self._adopt()
        pinned = [
            (pool, node)
            for pool, mgr in self.broker.core.pools.items()
            if (node := mgr.pin_of(trajectory)) is not None
        ]
        cancelled = self.broker.close_trajectory(trajectory)
        await self._remove_workdirs(trajectory, pinned)
        return cancelled

    async def observe_restore(
        self, pool: str, service: str, seconds: float, reload: bool = False
    ) -> None:
        """Feed a measured restore time into the GPU pool's cost model (a core event): a
        wake from host RAM, or with ``reload`` one that loaded the weights again."""
        what = "reload_seconds" if reload else "restore_seconds"
        with contextlib.suppress(ValueError):  # a pool or service a restart dropped
            self.broker.observe(pool, what, service, seconds)

    # ------------------------------------------------------------------ the HTTP hook
    async def serve_http(
        self,
        app_factory: Callable[[Broker], Any] | str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> int:
        """Serve an HTTP app on this actor's event loop over this actor's broker; return
        the port. By default the project's lease API (``tangram.server``); otherwise
        ``app_factory`` (a callable taking the ``Broker``, or ``"module:function"``)."""
        import uvicorn

        self._adopt()
        if self._http is not None:
            raise RuntimeError("this broker actor already serves HTTP")
        if app_factory is None:
            app = self._lease_api()
            # Served without a lifespan (below): the records of what this broker
            # restored from its journal are made here instead.
            app.state.service.adopt_restored()
        else:
            factory = app_factory
            if isinstance(factory, str):
                mod, _, fn = factory.partition(":")
                try:
                    factory = getattr(importlib.import_module(mod), fn)
                except (ImportError, AttributeError) as exc:
                    raise RuntimeError(
                        f"cannot load the HTTP app factory {mod}:{fn} ({exc})"
                    ) from None
            assert callable(factory)
            app = factory(self.broker)
        # No lifespan: the server's shutdown hook would close the broker, which outlives
        # the HTTP door here (Ray clients keep using it).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        self._http = server
        self._http_task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:
            if self._http_task.done():
                self._http = None
                self._http_task.result()  # raises the server's error
                raise RuntimeError("the HTTP server stopped at start-up")
            await asyncio.sleep(0.01)
        sock = server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    def _lease_api(self) -> Any:
        """The project's HTTP lease API over this actor's broker (one broker state, one
        metrics registry, whichever door a request uses)."""
        from tangram.server.app import create_app

        return create_app(self.config, broker=self.broker)

    async def stop_http(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                await self._http_task
            self._http = None
