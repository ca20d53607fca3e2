"""Summarise a PPO/GRPO run's metrics.jsonl: per-rollout and per-update keys, first/last/mean."""
import sys, json, statistics as st
for run in sys.argv[1:]:
    rows = [json.loads(l) for l in open(run + "/metrics.jsonl")]
    keys = sorted({k for r in rows for k in r if "/" in k or k in ("loss",)})
    print("==", run, f"({len(rows)} lines)")
    for k in keys:
        v = [r[k] for r in rows if k in r and isinstance(r[k], (int, float))]
        if not v: continue
        h = len(v) // 2
        print(f"  {k:32s} n={len(v):3d} first {v[0]:9.4f} last {v[-1]:9.4f} mean {st.mean(v):9.4f} "
              f"mean 2nd half {st.mean(v[h:]):9.4f}")
