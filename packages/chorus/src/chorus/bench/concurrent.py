"""`chorus bench --server URL --concurrency N`: the trace through N clients at once, to measure what several
replicas serve together (one request at a time would keep all but one of them idle).

Each policy replays the whole trace on its own (not interleaved with the others): N threads take the requests in
trace order, each sending one and waiting for its video before taking the next (closed loop). `wall_s` is the
time from the first request to the last video, so throughput counts the replicas working side by side. The videos
are scored after the clock stops. Requests in flight together cannot reuse each other, so the hit rate can only
be lower than a one-at-a-time replay's: the report says how much.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from .replay import _record, summarize_policy

POLL_S = 0.1


def replay(trace, policy_names, runner, steps: int, concurrency: int, policy_factory) -> dict[str, dict]:
    # N clients polling every 20 ms would take a share of a small machine's cores from the replicas they measure.
    runner.poll_s = max(runner.poll_s, POLL_S)
    results = {}
    for name in dict.fromkeys(policy_names):
        policy = policy_factory(name)
        runner.check(policy)
        with runner.session(policy) as serve:

            def one(i, serve=serve):
                start = time.perf_counter()
                report, frames = serve(trace[i])
                return report, frames, time.perf_counter() - start

            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                served = list(pool.map(one, range(len(trace))))
            wall = time.perf_counter() - start
        steps = steps or served[0][0]["num_steps"]  # the server's default when the bench did not set it
        records = [_record(i, trace[i], r, s, f, None) for i, (r, f, s) in enumerate(served)]
        for record in records:
            record.psnr = None  # no `none` run to compare with
        summary = summarize_policy(policy, trace, records, steps)
        summary.update(
            wall_s=wall,
            throughput_rps=len(trace) / wall if wall > 0 else None,
            concurrency=concurrency,
            replicas=dict(Counter(r.get("replica") or "-" for r, _, _ in served)),
            source_tiers=dict(Counter(r.get("source_tier") or "-" for r, _, _ in served)),
            speedup_vs_none=None,
            **{"pass": 1},
        )
        results[name] = summary
    return results
