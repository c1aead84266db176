"""ScoreSampler under torch.distributed: 2 CPU processes on the gloo backend, each running
tests/ddp_worker.py (InfoBatch, and the epoch style of MMS, CDF sampling and upper-bound
importance sampling, over the same data with deterministic fake scores). Checks
that the ranks' shards of every epoch are disjoint and together make the global plan (up
to the wrap padding), that both ranks keep identical score tables and plans, that the
global plans equal a single-process sampler's, and that a resume from every stop point
reproduces each rank's uninterrupted stream."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
WORLD = 2

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def load_worker():
    spec = importlib.util.spec_from_file_location("fastsel_ddp_worker", HERE / "ddp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["infobatch", "mms", "cdf", "upper"])
def strategy(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, strategy):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(WORLD), "OMP_NUM_THREADS": "1", "FASTSEL_DDP_STRATEGY": strategy}
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_worker.py"), str(out)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def worker(strategy):
    module = load_worker()
    module.STRATEGY = strategy
    return module


def test_ranks_see_the_world(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == WORLD for r in ranks)


def test_shards_are_disjoint_and_cover_the_global_plan(ranks, worker):
    for epoch in range(worker.EPOCHS):
        plan = ranks[0]["plans"][epoch][0].tolist()
        shards = [r["shards"][epoch] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == -(-len(plan) // WORLD), "every rank gets as many samples"
        pad = WORLD * len(shards[0]) - len(plan)
        assert 0 <= pad < WORLD
        interleaved = [shards[k % WORLD][k // WORLD] for k in range(WORLD * len(shards[0]))]
        assert interleaved == plan + plan[:pad], f"epoch {epoch}: shards are not the plan split by rank"
        assert set(shards[0]) | set(shards[1]) == set(plan)
        if len(set(plan)) < len(plan):  # a draw with replacement (upper-bound IS) repeats samples
            assert worker.STRATEGY == "upper"
            continue
        overlap = set(shards[0]) & set(shards[1])
        assert overlap <= set(plan[:pad]), f"epoch {epoch}: ranks share {overlap - set(plan[:pad])}"
        for r in range(WORLD):
            assert len(set(shards[r])) == len(shards[r]), "no sample twice on one rank"


def test_plan_sizes(ranks, worker):
    sizes = [ranks[0]["plans"][e][0].numel() for e in range(worker.EPOCHS)]
    assert worker.N % WORLD == 1, "an odd N exercises the wrap padding in the full epochs"
    if worker.STRATEGY == "infobatch":  # pruned, then full
        assert sizes[0] == sizes[3] == worker.N
        assert sizes[1] < worker.N and sizes[2] < worker.N
    else:  # full while nothing is scored, then the keep fraction
        assert sizes == [worker.N] + [round(worker.KEEP * worker.N)] * (worker.EPOCHS - 1)


def test_plans_and_tables_identical_across_ranks(ranks, worker):
    for epoch in range(worker.EPOCHS):
        (i0, w0), (i1, w1) = ranks[0]["plans"][epoch], ranks[1]["plans"][epoch]
        assert torch.equal(i0, i1) and torch.equal(w0, w1), f"epoch {epoch} plans differ across ranks"
        t0, t1 = ranks[0]["tables"][epoch], ranks[1]["tables"][epoch]
        for f in t0["last"]:
            torch.testing.assert_close(t0["last"][f], t1["last"][f], rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(t0["total"][f], t1["total"][f], rtol=0, atol=0)
        assert torch.equal(t0["count"], t1["count"]) and torch.equal(t0["last_epoch"], t1["last_epoch"])
    assert ranks[0]["costs"] == ranks[1]["costs"]


def test_tables_hold_every_ranks_scores(ranks, worker):
    """After each epoch, every sample that any rank trained holds its score of that epoch."""
    field = next(iter(ranks[0]["tables"][0]["last"]))
    expected = torch.full((worker.N,), float("nan"))
    for epoch in range(worker.EPOCHS):
        visited = torch.tensor(sorted(set(ranks[0]["shards"][epoch]) | set(ranks[1]["shards"][epoch])))
        expected[visited] = getattr(worker.fake_scores(visited, epoch), field)
        table = ranks[0]["tables"][epoch]
        torch.testing.assert_close(table["last"][field], expected, equal_nan=True)
        assert (table["last_epoch"][visited] == epoch).all()


def test_global_plans_equal_a_single_process_run(ranks, worker):
    single = worker.make_sampler(num_replicas=1, rank=0)
    for epoch in range(worker.EPOCHS):
        first = True
        for b in single:
            if first:
                idx, w = single.state_dict()["plan"]
                ddp_idx, ddp_w = ranks[0]["plans"][epoch]
                assert torch.equal(idx, ddp_idx) and torch.equal(w, ddp_w), f"epoch {epoch}"
                first = False
            t = torch.tensor(b)
            single.update(t, worker.fake_scores(t, epoch))


def test_weights_follow_the_plan(ranks, worker):
    r = 1 / (1 - worker.PRUNE)
    for rank in ranks:
        ends = [0] + rank["epoch_ends"]
        seen_rescaled = False
        for epoch in range(worker.EPOCHS):
            plan_w = rank["plans"][epoch][1]
            for b, w in rank["stream"][ends[epoch]:ends[epoch + 1]]:
                assert w == plan_w[b].tolist()
                if worker.STRATEGY == "infobatch":
                    assert all(v in (1.0, r) for v in w)
                    seen_rescaled |= any(v == r for v in w)
                else:  # ones (MMS) or importance weights (the sampling rules)
                    seen_rescaled |= any(v != 1.0 for v in w)
        assert seen_rescaled == (worker.STRATEGY != "mms")


def test_resume_on_both_ranks_reproduces_the_streams(ranks):
    for rank in ranks:
        stream = rank["stream"]
        assert sorted(rank["rest"]) == list(range(len(stream)))
        for stop, rest in rank["rest"].items():
            assert rest == stream[stop:], f"rank {rank['rank']}: resume after {stop} updates differs"
