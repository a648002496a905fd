"""LiteLLM calls under a Tangram quota pool: ``TangramQuota``, a LiteLLM callback.

Before each call (``litellm.acompletion`` and the other async calls, and every call the
LiteLLM proxy makes) the callback leases 1 permit of a quota pool from a Tangram server,
with the call's estimated tokens as the action's ``tokens``; after it, the lease is
released with the response's ``usage.total_tokens`` (``outcome="error"`` when the call
failed, charging the estimate). The pool's limits (concurrency, window, requests and
tokens per minute) then hold across every process that shares the server: any number of
proxy replicas, trainers and judges.

    import litellm
    from tangram.integrations.litellm import TangramQuota

    litellm.callbacks = [TangramQuota("http://broker:8000", pool="openai", token="...")]

A call the broker does not grant in ``timeout`` seconds, or that it refuses, raises
``litellm.RateLimitError`` with the broker's message (LiteLLM's retries and the router's
fallbacks treat it as the provider's 429); a call that could never fit the pool (more
tokens than its ``tokens_per_minute``) raises ``litellm.BadRequestError``.

The trajectory of the action is the call's ``metadata["tangram_trajectory"]`` when set
(so the broker's policy sees a trajectory's calls together), else the call's own id.
Only the async paths lease: LiteLLM runs the deployment hook this uses for async calls
and in the proxy, not for the sync ``litellm.completion``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import litellm
from litellm.exceptions import BadRequestError, RateLimitError
from litellm.integrations.custom_logger import CustomLogger

from tangram.client import HttpClient, InvalidAction, RemoteLease, TangramError
from tangram.spec import Action

__all__ = ["TangramQuota", "estimate_tokens", "total_tokens"]

log = logging.getLogger(__name__)

METADATA_KEY = "tangram_trajectory"


def estimate_tokens(kwargs: Mapping[str, Any]) -> int:
    """The tokens a call may use: its messages' tokens (LiteLLM's counter) plus its
    ``max_completion_tokens`` or ``max_tokens`` (0 when neither is set)."""
    messages = kwargs.get("messages")
    prompt = 0
    if messages:
        try:
            prompt = int(
                litellm.token_counter(model=str(kwargs.get("model") or ""), messages=messages)
            )
        except Exception:  # a tokenizer that cannot load: about 4 characters a token
            prompt = len(str(messages)) // 4
    completion = kwargs.get("max_completion_tokens") or kwargs.get("max_tokens") or 0
    return prompt + int(completion)


def total_tokens(response: Any) -> int | None:
    """``usage.total_tokens`` of a LiteLLM response (an object or a dict), if it has one."""
    usage = (
        response.get("usage") if isinstance(response, Mapping) else getattr(response, "usage", None)
    )
    if usage is None:
        return None
    total = (
        usage.get("total_tokens")
        if isinstance(usage, Mapping)
        else getattr(usage, "total_tokens", None)
    )
    return int(total) if isinstance(total, int | float) else None


class TangramQuota(CustomLogger):
    """Lease a permit of ``pool`` on the Tangram server at ``url`` for every LiteLLM call.

    ``timeout``: the longest a call waits for its permit (then ``RateLimitError``);
    ``ttl``: the lease's time to live (the server's default when None; a proxy that dies
    mid-call gives its permits back when it lapses); ``estimate``: the tokens a call is
    expected to use, from the call's arguments (``estimate_tokens`` by default).
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        pool: str = "api",
        token: str | None = None,
        timeout: float = 60.0,
        ttl: float | None = None,
        estimate: Callable[[Mapping[str, Any]], int] = estimate_tokens,
        client: Callable[[], HttpClient] | None = None,
    ) -> None:
        super().__init__()
        self.url = url
        self.pool = pool
        self.token = token
        self.timeout = timeout
        self.ttl = ttl
        self.estimate = estimate
        self._make_client = client or (lambda: HttpClient(url, token=token))
        # One client per event loop (an httpx client is bound to the loop it runs on).
        self._clients: dict[asyncio.AbstractEventLoop, HttpClient] = {}
        self._leases: dict[str, RemoteLease] = {}

    def _client(self) -> HttpClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            for old in [x for x in self._clients if x.is_closed()]:
                del self._clients[old]
            client = self._clients[loop] = self._make_client()
        return client

    async def aclose(self) -> None:
        """Close the current event loop's client."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()

    @property
    def held(self) -> int:
        """Leases held now: calls granted and not yet finished."""
        return len(self._leases)

    # ---- LiteLLM's hooks --------------------------------------------------------------
    async def async_pre_call_deployment_hook(
        self, kwargs: dict[str, Any], call_type: Any
    ) -> dict[str, Any] | None:
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = uuid.uuid4().hex
        stale = self._leases.pop(call_id, None)
        if stale is not None:  # a retry under the same id: the earlier attempt is over
            await self._release(stale, "error", None)
        action = Action.build(
            trajectory(kwargs) or call_id,
            {self.pool: 1},
            tokens=self.estimate(kwargs),
            ttl=self.ttl,
        )
        model = str(kwargs.get("model") or "")
        provider = str(kwargs.get("custom_llm_provider") or "tangram")
        try:
            lease = await self._client().acquire(action, timeout=self.timeout)
        except InvalidAction as exc:
            raise BadRequestError(
                message=f"Tangram quota pool {self.pool!r} refused the call: {exc}",
                model=model,
                llm_provider=provider,
            ) from exc
        except (TangramError, TimeoutError) as exc:
            raise RateLimitError(
                message=f"Tangram quota pool {self.pool!r}: {exc}",
                llm_provider=provider,
                model=model,
            ) from exc
        self._leases[call_id] = lease
        return None

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        lease = self._leases.pop(str(kwargs.get("litellm_call_id")), None)
        if lease is not None:
            tokens = total_tokens(response_obj)
            await self._release(lease, "ok", None if tokens is None else {"tokens": tokens})

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        lease = self._leases.pop(str(kwargs.get("litellm_call_id")), None)
        if lease is not None:
            await self._release(lease, "error", None)

    async def _release(
        self, lease: RemoteLease, outcome: str, usage: Mapping[str, Any] | None
    ) -> None:
        try:
            await self._client().release_lease(lease, outcome, usage)
        except (TangramError, httpx.HTTPError) as exc:  # lapsed, or the broker is away
            log.warning("Tangram lease %s not released: %s", lease.id, exc)


def trajectory(kwargs: Mapping[str, Any]) -> str | None:
    """The call's ``metadata["tangram_trajectory"]`` (also under ``litellm_params``, where
    the proxy keeps it), if set."""
    sources = [kwargs.get("metadata"), kwargs.get("litellm_metadata")]
    params = kwargs.get("litellm_params")
    if isinstance(params, Mapping):
        sources.append(params.get("metadata"))
    for meta in sources:
        if isinstance(meta, Mapping) and meta.get(METADATA_KEY):
            return str(meta[METADATA_KEY])
    return None
