"""The shared cache store against a real redis-server: what one process writes another finds, atomically, within one
budget, with aliases, partial reads and a bounded local tier."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from chorus.cache import CacheEntry, LRUPolicy, RequestCache
from chorus.cache.redis_store import LocalTier, RedisStore

from .test_cache import SIG, entry_bytes, make_entry


@pytest.fixture
def stores(redis_server, redis_prefix):
    """Two stores on one Redis, as two replicas would hold them."""
    made = []

    def make(budget=1 << 20, local=1 << 20, name=None, policy=None):
        store = RedisStore(redis_server.url, budget, policy, prefix=redis_prefix, local_bytes=local, name=name)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_an_entry_written_by_one_process_is_found_and_read_by_another(stores):
    a, b = stores(name="a"), stores(name="b")
    cache_a, cache_b = RequestCache(a, 8), RequestCache(b, 8)
    entry = make_entry("e1", prompt="a red circle", seed=3)
    cache_a.insert(entry)
    assert cache_b.exact(SIG.key(), "a red circle", 3) == "e1"
    [match] = cache_b.nearest(SIG.key(), entry.meta.embedding, k=1)
    assert match.entry_id == "e1" and match.similarity == pytest.approx(1.0, abs=1e-5)
    partial = cache_b.load("e1", {"probe"})
    assert set(partial.tensors) == {"probe"} and torch.equal(partial.probe, entry.probe)
    assert b.reads["e1"] == "shared"  # b fetched it from Redis ...
    assert cache_b.load("e1", {"probe"}) is not None and b.reads["e1"] == "local"  # ... and now holds it
    assert a.holders("e1") == {"a", "b"}
    full = cache_b.load("e1")
    assert torch.equal(full.trajectory, entry.trajectory) and torch.equal(full.final_latent, entry.final_latent)
    assert full.signature == SIG and full.meta.prompt == "a red circle"
    late = RequestCache(stores(), 8)  # a process that starts later finds everything written before
    assert late.exact(SIG.key(), "a red circle", 3) == "e1"


def test_a_staged_entry_is_invisible_until_committed_and_expires_if_never_committed(stores, redis_server, redis_prefix):
    writer, reader = stores(), stores()
    cache = RequestCache(reader, 8)
    entry = make_entry("half", prompt="a blue square")
    entry.meta.nbytes = entry.nbytes
    writer.stage(entry)  # the tensors are in Redis ...
    assert redis_server.client().hlen(f"{redis_prefix}:cache:t:half") == len(entry.tensors)
    assert cache.exact(SIG.key(), "a blue square", 0) is None  # ... but no other process sees the entry
    assert cache.nearest(SIG.key(), entry.meta.embedding) == [] and reader.get("half") is None
    assert "half" not in reader and reader.nbytes == 0
    assert 0 < redis_server.client().ttl(f"{redis_prefix}:cache:t:half") <= 3600  # an abandoned write expires
    writer.commit(entry)
    assert cache.exact(SIG.key(), "a blue square", 0) == "half" and reader.nbytes == entry.nbytes
    assert redis_server.client().ttl(f"{redis_prefix}:cache:t:half") == -1  # committed: kept


def test_a_writer_killed_between_its_tensors_and_its_commit_leaves_nothing_visible(redis_server, redis_prefix):
    script = textwrap.dedent(
        f"""
        import os, signal
        from chorus.cache.redis_store import RedisStore
        from tests.chorus.test_cache import make_entry
        store = RedisStore({redis_server.url!r}, prefix={redis_prefix!r})
        entry = make_entry("killed", prompt="a green triangle")
        entry.meta.nbytes = entry.nbytes
        store.stage(entry)
        os.kill(os.getpid(), signal.SIGKILL)  # dies where a crash between the two writes would
        store.commit(entry)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    reader = RedisStore(redis_server.url, prefix=redis_prefix)
    assert len(reader) == 0 and reader.get("killed") is None and reader.nbytes == 0
    assert RequestCache(reader, 8).exact(SIG.key(), "a green triangle", 0) is None
    reader.close()


def test_the_budget_and_the_policy_hold_across_processes(stores):
    size = entry_bytes()
    a, b = stores(budget=3 * size, policy=LRUPolicy()), stores(budget=3 * size, policy=LRUPolicy())
    cache_a, cache_b = RequestCache(a, 8), RequestCache(b, 8)
    for i, cache in enumerate([cache_a, cache_b, cache_a]):
        cache.insert(make_entry(f"e{i}", prompt=f"p{i}"))
        time.sleep(0.002)
    b.record_hit("e0", 1)  # e0 is now the most recently used, though b never wrote it
    evicted = b.put(make_entry("e3", prompt="p3"))
    assert evicted == ["e1"] and a.nbytes == b.nbytes == 3 * size
    assert len(a) == len(b) == 3 and cache_a.exact(SIG.key(), "p1", 0) is None  # a's index follows b's eviction
    assert a.get("e1") is None and a.get("e0") is not None


def test_an_alias_written_by_one_process_reads_its_origin_in_another_and_leaves_with_it(stores):
    a, b = stores(), stores()
    RequestCache(a, 8).insert(make_entry("origin", prompt="a red circle"))
    alias = make_entry("alias", prompt="a scarlet disc", seed=7).meta
    alias.alias_of = "origin"
    b.put(CacheEntry(alias, SIG))
    cache_a = RequestCache(a, 8)
    assert cache_a.load("alias", {"final_latent"}).meta.alias_of == "origin" and a.nbytes == entry_bytes()
    b.remove("origin")
    assert cache_a.exact(SIG.key(), "a scarlet disc", 7) is None and len(a) == 0


def test_the_local_tier_keeps_its_byte_bound_and_reads_fall_back_to_redis(stores):
    size = make_entry("x").tensors["trajectory"].numel() * 2
    a = stores(local=int(size * 1.5), name="a")
    cache = RequestCache(a, 8)
    cache.insert(make_entry("e1", prompt="p1"))
    cache.insert(make_entry("e2", prompt="p2"))
    assert a.tier.nbytes <= a.tier.max_bytes
    assert "e1" not in a.tier.entries() and a.holders("e1") == set()  # pushed out of the tier, and unpublished
    entry = cache.load("e1", {"trajectory"})
    assert entry is not None and a.reads["e1"] == "shared"


def test_local_tier_is_least_recently_used_first():
    tier = LocalTier(max_bytes=3 * 4)
    for name in "abc":
        tier.put("e", name, torch.zeros(1))
    tier.get("e", "a")
    tier.put("f", "d", torch.zeros(1))
    assert tier.get("e", "b") is None and tier.get("e", "a") is not None and tier.nbytes == 12


def test_events_trimmed_away_make_a_process_reload(stores, redis_server, redis_prefix):
    a, b = stores(), stores()
    cache_b = RequestCache(b, 8)
    RequestCache(a, 8).insert(make_entry("e1", prompt="p1"))
    redis_server.client().xtrim(f"{redis_prefix}:cache:events", maxlen=0)
    RequestCache(a, 8).insert(make_entry("e2", prompt="p2"))
    redis_server.client().xtrim(f"{redis_prefix}:cache:events", maxlen=0)
    RequestCache(a, 8).insert(make_entry("e3", prompt="p3"))
    assert {cache_b.exact(SIG.key(), f"p{i}", 0) for i in (1, 2, 3)} == {"e1", "e2", "e3"}
    assert np.isclose(b.nbytes, 3 * entry_bytes())
