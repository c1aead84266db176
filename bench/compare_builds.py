#!/usr/bin/env python
"""Two builds of fastsel side by side: the microbenchmarks of each, alternated round by
round in fresh processes (A, B, A, B, ...; one process can load one build only), and the
median ratio B / A of every fastsel timing. For a change that must not slow anything
down (a refactoring, the runtime ISA dispatch): ratios within the rounds' spread are
noise.

    python bench/compare_builds.py --a /path/to/old/checkout --b . --rounds 3 --out bench/results/compare

Each checkout needs its extension built in place (``python setup.py build_ext --inplace``
or ``pip install -e .``). Writes ``compare.md`` and ``compare.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

BENCHES = {"score": ("bench_score.py", "score_bench.csv"), "select": ("bench_select.py", "select_bench.csv")}


def run_once(tree: Path, bench: str, out: Path, extra: tuple = ()) -> list[dict]:
    script, name = BENCHES[bench]
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [str(tree / "bench" / script), "--representative", "--out", str(out), *extra]
    code = ("import sys, runpy; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
            f"sys.argv = {argv!r}; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{bench} in {tree} failed:\n{done.stderr[-3000:]}")
    with open(out / name) as f:
        return list(csv.DictReader(f))


def key_and_ms(bench: str, row: dict):
    """(case, method) and the median ms of a fastsel row, else None."""
    method = row.get("method", "")
    if not method.startswith("fastsel"):
        return None
    ms = row.get("median_ms") or row.get("median ms")
    if ms in (None, "", "-"):
        return None
    case = " ".join(f"{k}={row[k]}" if k in ("n", "c", "k", "weight_dim") else row[k]
                    for k in ("dtype", "mode", "op", "n", "c", "k", "mms", "weight_dim", "baseline") if row.get(k))
    return (bench, case, method), float(ms)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="the baseline checkout (built)")
    parser.add_argument("--b", type=Path, required=True, help="the checkout compared with it (built)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--benches", default="score,select", help="comma-separated subset of score,select")
    parser.add_argument("--score-shapes", help="NxC list for bench_score.py (default: its representative "
                                               "shape), e.g. 64x10,65536x1000 to include per-call overhead")
    parser.add_argument("--out", type=Path, default=Path("bench/results/compare"))
    args = parser.parse_args(argv)
    extra = {"score": ("--shapes", args.score_shapes) if args.score_shapes else (), "select": ()}
    unknown = set(args.benches.split(",")) - set(BENCHES)
    if unknown:
        parser.error(f"unknown benches {sorted(unknown)}; choose from {sorted(BENCHES)}")
    times: dict = defaultdict(lambda: {"a": [], "b": []})
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, tree in (("a", args.a), ("b", args.b)) if r % 2 == 0 else (("b", args.b), ("a", args.a)):
                for bench in args.benches.split(","):
                    print(f"round {r + 1}/{args.rounds}: {bench} of {side} ({tree})", flush=True)
                    for row in run_once(tree.resolve(), bench, Path(tmp), extra[bench]):
                        got = key_and_ms(bench, row)
                        if got:
                            times[got[0]][side].append(got[1])
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for (bench, case, method), t in sorted(times.items()):
        if not t["a"] or not t["b"]:
            continue
        ratios = [b / a for a, b in zip(t["a"], t["b"])]
        rows.append({"bench": bench, "case": case, "method": method, "a_ms": statistics.median(t["a"]),
                     "b_ms": statistics.median(t["b"]), "ratio_b_over_a": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ratios)})
    with open(args.out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {args.b} against {args.a}", "",
             f"{args.rounds} rounds, alternated (A B, B A, ...), `--representative` runs"
             f"{f' (bench_score.py --shapes {args.score_shapes})' if args.score_shapes else ''}; "
             "ratio = B / A per round, median and range.", "",
             "| bench | case | method | A ms | B ms | B / A (median) | range |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['bench']} | {r['case']} | {r['method']} | {r['a_ms']:.3g} | {r['b_ms']:.3g} | "
                     f"{r['ratio_b_over_a']:.3f} | {r['ratio_min']:.3f}–{r['ratio_max']:.3f} |")
    ratios = [r["ratio_b_over_a"] for r in rows]
    lines += ["", f"Median over all rows: {statistics.median(ratios):.3f} ({len(rows)} rows)."]
    (args.out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
