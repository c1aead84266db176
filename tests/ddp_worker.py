"""One rank of the DDP test (tests/test_ddp.py): ScoreSampler under torch.distributed
(gloo, CPU) with deterministic fake scores, for the strategy named by
$FASTSEL_DDP_STRATEGY (``STRATEGIES``; default InfoBatch).

Run as ``python tests/ddp_worker.py OUT_DIR`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment. Writes ``OUT_DIR/rank{RANK}.pt`` holding the rank's
uninterrupted stream of (batch indices, weights), the global plan and the score table of
every epoch, and the remaining stream after a resume from every stop point.
The test imports this file too, for the constants and the fake scores.
"""

from __future__ import annotations

import io
import os
import sys
from datetime import timedelta

import torch
from torch.utils.data import TensorDataset

import fastsel

N, BATCH, EPOCHS, SEED, C = 103, 8, 4, 3, 5
PRUNE, DELTA = 0.5, 0.75  # epochs 1 and 2 prune, 0 (nothing scored yet) and 3 (annealing) are full
KEEP = 0.5  # the epoch-style rules: epoch 0 full (nothing scored yet), then round(KEEP * N)
HEAD = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.5], [0.3, -2.0]])  # [C, 2]: for the MMS
STRATEGIES = {
    "infobatch": lambda: fastsel.strategies.InfoBatch(prune_ratio=PRUNE, delta=DELTA),
    "mms": lambda: fastsel.strategies.MMS(KEEP),
    "cdf": lambda: fastsel.strategies.CDFSampling(KEEP, switch_ratio=None, reweight=True),
    "upper": lambda: fastsel.strategies.UpperBoundIS(KEEP),
}
STRATEGY = os.environ.get("FASTSEL_DDP_STRATEGY", "infobatch")


def fake_scores(idx: torch.Tensor, epoch: int) -> fastsel.Scores:
    """Scores that are a fixed function of (dataset index, epoch)."""
    i = idx.to(torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    logits = (3.0 * torch.sin(0.731 * i * (j + 1) + 0.37 * epoch * (j + 2))).to(torch.float32)
    return fastsel.score(logits, idx % C, head=HEAD)


def make_sampler(**kw) -> fastsel.ScoreSampler:
    data = fastsel.Indexed(TensorDataset(torch.arange(N)))
    kw.setdefault("drop_last", False)  # the tests count every planned sample
    return fastsel.ScoreSampler(data, STRATEGIES[STRATEGY](), batch_size=BATCH, epochs=EPOCHS, seed=SEED, **kw)


def serialize(state) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    sampler = make_sampler()  # num_replicas and rank from torch.distributed
    assert (sampler.num_replicas, sampler.rank) == (world, rank), (sampler.num_replicas, sampler.rank)

    stream, plans, tables, shards, epoch_ends = [], [], [], [], []
    states = {0: serialize(sampler.state_dict())}  # before any iteration
    for _ in range(EPOCHS):
        epoch = []
        for b in sampler:
            if not epoch:  # the global plan, once the epoch has started
                plans.append(sampler.state_dict()["plan"])
            idx = torch.tensor(b)
            epoch.append((b, sampler.weights(idx).tolist()))
            sampler.update(idx, fake_scores(idx, sampler.epoch))
            states[sampler.costs.steps] = serialize(sampler.state_dict())  # mid-epoch and at its end
        stream += epoch
        shards.append([i for b, _ in epoch for i in b])
        tables.append(sampler.table.state_dict())
        epoch_ends.append(sampler.costs.steps)
    total = sampler.costs.steps

    # Resume from every stop point (the same on every rank, so the collectives match).
    rest = {}
    for stop in range(total):
        fresh = make_sampler()
        fresh.load_state_dict(torch.load(io.BytesIO(states[stop])))
        got = []
        for _ in range(EPOCHS + 1):  # bounded: a broken resume must not loop forever
            if fresh.costs.steps >= total:
                break
            for b in fresh:
                idx = torch.tensor(b)
                got.append((b, fresh.weights(idx).tolist()))
                fresh.update(idx, fake_scores(idx, fresh.epoch))
        rest[stop] = got

    torch.save({"rank": rank, "world": world, "stream": stream, "plans": plans, "tables": tables,
                "shards": shards, "epoch_ends": epoch_ends, "rest": rest, "costs": sampler.costs.as_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
