"""Similarity-aware routing: a Ray Serve request router that sends a request to a replica whose local tier holds its
best source, unless the queues are imbalanced; otherwise power of two choices.

The ingress finds the request's best source (an exact repeat, else the nearest cached prompt, as the engine would)
and which replicas hold it in their local tier (`RedisStore.holders`), and passes their ids as the call's `prefer`
argument. The router is Ray Serve's `PrefixCacheAffinityRouter` pattern with that hint in place of a prefix tree:
the holders rank first while the longest queue among them is within `imbalanced_threshold` requests of the
shortest queue of all; else, and for a request without a hint, Ray Serve's power of two choices decides.
"""

from __future__ import annotations

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import LocalityMixin, MultiplexMixin, RequestRouter


class SimilarityAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalanced_threshold: int = 0):
        self.imbalanced_threshold = imbalanced_threshold

    @staticmethod
    def preferred(pending_request: PendingRequest | None) -> list[str]:
        if pending_request is None:
            return []
        prefer = pending_request.kwargs.get("prefer")
        if prefer is None and len(pending_request.args) > 1:
            prefer = pending_request.args[1]
        return list(prefer or [])

    async def _queue_lens(self, replicas: list[RunningReplica]) -> dict:
        lens, unknown = {}, []
        for r in replicas:
            n = self._replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if n is None:
                unknown.append(r)
            else:
                lens[r.replica_id] = n
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                if n is not None:
                    lens[r.replica_id] = n
        return lens

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        fallback = await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas, pending_request)
        wanted = set(self.preferred(pending_request))
        holders = [r for r in candidate_replicas if r.replica_id.unique_id in wanted]
        if not holders:
            return fallback
        lens = await self._queue_lens(candidate_replicas)
        if not lens:
            return fallback
        shortest = min(lens.values())
        holders = [r for r in holders if lens.get(r.replica_id, float("inf")) - shortest <= self.imbalanced_threshold]
        if not holders:  # the holders are busy: waiting for them would cost more than fetching the source
            return fallback
        return [holders, *fallback]
