#!/usr/bin/env python
"""Per-call cost of small fastsel calls (64 x 10 logits, a 64-score top-k) in two built
checkouts, alternated in fresh processes: what a change to the Python layers (validation,
dispatch, building ``Scores``) adds to every call, where the kernels themselves take
microseconds; plus one 4096 x 1000 forward for the kernel. Best of 7 repeats, one
thread; medians over the rounds.

    python bench/call_overhead.py --a /path/to/old/checkout --b . --rounds 3 [--isa avx2]

Each checkout needs its extension built in place (as for bench/compare_builds.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = r'''
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
import json, timeit, torch, fastsel
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 10, generator=g); t = torch.randint(0, 10, (64,), generator=g)
w = torch.randn(10, 512, generator=g); s = x[:, 0].contiguous()
big_x = torch.randn(4096, 1000, generator=g); big_t = torch.randint(0, 1000, (4096,), generator=g)
calls = {  # name: (call, calls per timing)
    "score cpu": (lambda: fastsel.score(x, t, backend="cpu"), 2000),
    "score cpu, top-2 MMS": (lambda: fastsel.score(x, t, head=w, mms="top2", backend="cpu"), 2000),
    "score torch": (lambda: fastsel.score(x, t, backend="torch"), 2000),
    "select_topk cpu": (lambda: fastsel.select_topk(s, 5, backend="cpu"), 2000),
    "score cpu 4096x1000 (" + fastsel.build_info()["isa"] + ")": (lambda: fastsel.score(big_x, big_t, backend="cpu"), 5),
}
out = {}
for name, (f, number) in calls.items():
    for _ in range(max(5, number // 10)):
        f()
    out[name] = min(timeit.repeat(f, number=number, repeat=7)) / number * 1e6
print(json.dumps(out))
'''


def run(tree: Path, isa: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", FASTSEL_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout (built)")
    parser.add_argument("--b", type=Path, required=True, help="the checkout compared with it (built)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--isa", default="auto", help="FASTSEL_CPU_ISA of both (auto, avx2, none)")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here too")
    args = parser.parse_args(argv)
    times = {"a": [], "b": []}
    for r in range(args.rounds):
        for side in ("a", "b") if r % 2 == 0 else ("b", "a"):
            times[side].append(run(getattr(args, side).resolve(), args.isa))
    lines = [f"# Per-call cost, {args.b} against {args.a}", "",
             f"{args.rounds} rounds alternated in fresh processes, FASTSEL_CPU_ISA={args.isa}; best of 7 x 2000 "
             "calls per round (7 x 5 for 4096x1000), one thread; medians over the rounds, microseconds per call.", "",
             "| call | A µs | B µs | B / A |", "|---|---:|---:|---:|"]
    for name in times["a"][0]:
        a = statistics.median(t[name] for t in times["a"])
        b = statistics.median(t[name] for t in times["b"])
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
