"""Cache stores, eviction and retrieval: budgets, persistence across processes, and crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from chorus.cache import (
    BenefitPolicy,
    CacheEntry,
    DiskStore,
    EntryMeta,
    GenerationSignature,
    LRUPolicy,
    MemoryStore,
    RequestCache,
    VectorIndex,
)

SIG = GenerationSignature("m", "wan2.1", "float32", "c", "S", "s", 16, 16, 5, 4, 1.0, "", 32)


def make_entry(entry_id: str, prompt: str = "p", seed: int = 0, elements: int = 1000, signature=SIG) -> CacheEntry:
    rng = np.random.default_rng(abs(hash(entry_id)) % 2**32)
    emb = rng.standard_normal(8).astype(np.float32)
    emb /= np.linalg.norm(emb)
    meta = EntryMeta(entry_id, signature.key(), prompt, seed, emb, nbytes=0)
    trajectory = torch.from_numpy(rng.standard_normal((5, elements)).astype(np.float16))
    final = torch.from_numpy(rng.standard_normal(elements).astype(np.float32))
    return CacheEntry.build(meta, signature, trajectory, final, probe=trajectory[1].clone())


def entry_bytes(elements=1000):
    return make_entry("x", elements=elements).nbytes


def test_memory_store_lru_eviction_keeps_budget():
    size = entry_bytes()
    store = MemoryStore(budget_bytes=3 * size, policy=LRUPolicy())
    for i in range(3):
        store.put(make_entry(f"e{i}"))
        time.sleep(0.002)
    store.record_hit("e0", 1)  # e0 becomes the most recently used
    evicted = store.put(make_entry("e3"))
    assert evicted == ["e1"] and len(store) == 3 and store.nbytes <= store.budget_bytes


def test_benefit_eviction_keeps_entries_that_save_the_most():
    size = entry_bytes()
    store = MemoryStore(budget_bytes=3 * size, policy=BenefitPolicy())
    for i in range(3):
        store.put(make_entry(f"e{i}"))
    for _ in range(3):
        store.record_hit("e0", 2)  # old but often hit, saving 2 steps each time
    store.record_hit("e2", 1)
    evicted = store.put(make_entry("e3"))
    assert evicted == ["e1"]  # never hit: least benefit; LRU would have dropped e0 first
    evicted = store.put(make_entry("e4"))
    assert "e0" not in evicted


def test_entry_larger_than_budget_is_not_stored():
    store = MemoryStore(budget_bytes=entry_bytes() // 2)
    assert store.put(make_entry("big")) == ["big"] and len(store) == 0


def test_vector_index_is_partitioned_by_signature():
    index = VectorIndex(3)
    index.add("a", "x", np.array([1, 0, 0], np.float32))
    index.add("a", "y", np.array([0, 1, 0], np.float32))
    index.add("b", "z", np.array([0.9, 0.1, 0], np.float32))
    best = index.search("a", np.array([0.8, 0.6, 0], np.float32), k=2)
    assert [e for e, _ in best] == ["x", "y"] and best[0][1] == pytest.approx(0.8)
    assert index.search("c", np.array([1, 0, 0], np.float32)) == []
    index.remove("x")
    assert index.search("a", np.array([1, 0, 0], np.float32))[0][0] == "y"
    with pytest.raises(ValueError, match="dimension"):
        index.search("a", np.ones(4, np.float32))


def test_disk_store_round_trip_and_request_cache_rebuilds_index(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    entry = make_entry("e1", prompt="a red circle")
    entry.tensors["features/cond/1/k"] = torch.arange(6.0).reshape(2, 3)
    store.put(entry)
    store.record_hit("e1", 2)
    store.close()

    cache = RequestCache(DiskStore(tmp_path, budget_bytes=1 << 20), embedding_dim=8)
    [match] = cache.nearest(SIG.key(), entry.meta.embedding)
    assert match.entry_id == "e1" and match.similarity == pytest.approx(1.0, abs=1e-5)
    loaded = cache.load("e1")
    torch.testing.assert_close(loaded.trajectory, entry.trajectory, rtol=0, atol=0)
    torch.testing.assert_close(loaded.tensors["features/cond/1/k"], entry.tensors["features/cond/1/k"])
    assert loaded.meta.hits == 1 and loaded.meta.saved_steps == 2 and loaded.signature == SIG
    assert cache.exact(SIG.key(), "a red circle", 0) == "e1" and cache.seeds(SIG.key(), "a red circle") == {0}
    partial = cache.load("e1", {"probe", "not stored"})  # only what is asked for (and stored) is read
    assert set(partial.tensors) == {"probe"}
    with pytest.raises(KeyError, match="trajectory"):
        _ = partial.trajectory


@pytest.mark.parametrize("kind", ["memory", "disk", "redis"])
def test_aliases_read_their_origin_take_no_budget_and_leave_with_it(tmp_path, kind, request):
    size = entry_bytes()
    if kind == "redis":
        from chorus.cache.redis_store import RedisStore

        url, prefix = request.getfixturevalue("redis_server").url, request.getfixturevalue("redis_prefix")
        store = RedisStore(url, budget_bytes=2 * size, prefix=prefix)
    else:
        store = MemoryStore(budget_bytes=2 * size) if kind == "memory" else DiskStore(tmp_path, budget_bytes=2 * size)
    cache = RequestCache(store, embedding_dim=8)
    origin = make_entry("origin", prompt="a red circle")
    cache.insert(origin)
    alias_meta = make_entry("alias", prompt="a scarlet disc", seed=7).meta
    alias_meta.alias_of = "origin"
    cache.insert(CacheEntry(alias_meta, SIG))
    assert store.nbytes == size and cache.exact(SIG.key(), "a scarlet disc", 7) == "alias"
    loaded = cache.load("alias", {"final_latent"})
    assert loaded.meta.entry_id == "alias" and torch.equal(loaded.final_latent, origin.final_latent)
    if kind == "disk":  # the alias row survives a restart
        store.close()
        store = DiskStore(tmp_path, budget_bytes=2 * size)
        cache = RequestCache(store, embedding_dim=8)
        assert cache.exact(SIG.key(), "a scarlet disc", 7) == "alias"
    cache.insert(make_entry("e1"))
    evicted = store.put(make_entry("e2"))  # over budget: the oldest entry goes, and its alias with it
    assert set(evicted) == {"origin", "alias"} and len(store) == 2
    orphan = make_entry("orphan").meta
    orphan.alias_of = "origin"  # its origin is gone: not stored
    assert store.put(CacheEntry(orphan, SIG)) == ["orphan"]


def test_damaged_entry_file_is_a_miss_and_is_dropped(tmp_path):
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    store.put(make_entry("e1"))
    (tmp_path / "entries" / "e1.safetensors").write_bytes(b"not a safetensors file")
    assert store.get("e1") is None and "e1" not in store


@pytest.mark.slow  # a second process
def test_disk_cache_survives_a_new_process(tmp_path, tiny_wan_dir):
    script = textwrap.dedent(
        f"""
        import json, sys
        from chorus.engine import ChorusEngine
        engine = ChorusEngine.from_pretrained({str(tiny_wan_dir)!r}, cache_dir={str(tmp_path)!r})
        r = engine.generate("a red circle moving left", seed=1, num_inference_steps=3, guidance_scale=1.0,
                            height=16, width=16, num_frames=5).report
        print(json.dumps(r.to_dict()))
        """
    )
    import json

    outputs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    assert outputs[0]["outcome"] == "miss" and outputs[0]["stored"]
    assert outputs[1]["outcome"] == "exact" and outputs[1]["source_id"] == outputs[0]["request_id"]
    assert outputs[1]["transformer_calls"] == 0


CRASH_SCRIPT = """
import os, sys, time
import chorus.cache.store as store_mod
from tests.chorus.test_cache import make_entry
window = sys.argv[2]
real_save, real_replace = store_mod.save_file, store_mod.os.replace

def slow_save(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:  # leave a torn temporary file behind
        f.truncate(os.path.getsize(path) // 2)
    if window == "writing":
        print("READY", flush=True); time.sleep(60)

def replace_then_hang(src, dst):
    real_replace(src, dst)
    if window == "indexing":  # the file is in place but its index row is not committed
        print("READY", flush=True); time.sleep(60)

store = store_mod.DiskStore(sys.argv[1], budget_bytes=1 << 20)
store.put(make_entry("good", prompt="kept"))
if window == "writing":
    store_mod.save_file = slow_save
else:
    store_mod.os.replace = replace_then_hang
store.put(make_entry("torn", prompt="lost"))
"""


@pytest.mark.parametrize("window", ["writing", "indexing"])
def test_process_killed_while_writing_leaves_no_entry_that_loads_wrong(tmp_path, window):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), window],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = DiskStore(tmp_path, budget_bytes=1 << 20)
    assert [m.entry_id for m in store.metas()] == ["good"]
    assert store.get("good").meta.prompt == "kept"
    assert sorted(p.name for p in (tmp_path / "entries").iterdir()) == ["good.safetensors"]
