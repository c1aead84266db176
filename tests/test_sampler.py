"""ScoreSampler (epoch style), Indexed and ScoreTable, with the Uniform and InfoBatch
strategies: the README examples end to end, epoch semantics, InfoBatch's pruning and
weights, exact resume at every stop point, DataLoader workers, bad input, costs, hooks."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastsel
from fastsel.strategies import InfoBatch, ScoreTable, StyleError, Uniform

C = 5


# ---------------------------------------------------------------- helpers

class Net(nn.Module):
    """A tiny classifier with the ``fc`` head the README examples use."""

    def __init__(self, d: int = 8, hidden: int = 16, c: int = C):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc(self.body(x))


def toy_set(n: int, d: int = 8, c: int = C, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, d, generator=g) + 0.5 * nn.functional.one_hot(y, d).float()
    return TensorDataset(x, y)


def fake_logits(idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
    """Logits that are a fixed function of (dataset index, epoch): the score table then
    evolves the same way in every run, without a model."""
    i = idx.to(torch.float64)[:, None]
    j = torch.arange(C, dtype=torch.float64)[None, :]
    return (3.0 * torch.sin(0.731 * i * (j + 1) + 0.37 * epoch * (j + 2))).to(torch.float32)


def fake_scores(idx: torch.Tensor, epoch: int = 0) -> fastsel.Scores:
    return fastsel.score(fake_logits(idx, epoch), idx % C)


def fake_losses(n: int, epoch: int = 0) -> torch.Tensor:
    return fake_scores(torch.arange(n), epoch).loss


def indexed(n: int) -> fastsel.Indexed:
    return fastsel.Indexed(TensorDataset(torch.arange(n)))


def run_epoch(sampler: fastsel.ScoreSampler, *, update: bool = True):
    """One epoch straight from the sampler: [(batch indices, weights)]."""
    out = []
    for b in sampler:
        idx = torch.tensor(b)
        out.append((b, sampler.weights(idx).tolist()))
        if update:
            sampler.update(idx, fake_scores(idx, sampler.epoch))
    return out


# ---------------------------------------------------------------- README examples

def test_readme_score_sampler_example_runs_end_to_end():
    torch.manual_seed(0)
    train_set = toy_set(256)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    E = 8
    data = fastsel.Indexed(train_set)
    sampler = fastsel.ScoreSampler(data, fastsel.strategies.InfoBatch(), batch_size=32, epochs=E, seed=0, drop_last=False)
    before = copy.deepcopy(model.state_dict())
    per_epoch = []
    for epoch in range(E):
        seen = []
        for x, y, idx in DataLoader(data, batch_sampler=sampler):
            assert idx.dtype == torch.int64
            torch.testing.assert_close(x, train_set.tensors[0][idx])  # items are (x, y, index)
            torch.testing.assert_close(y, train_set.tensors[1][idx])
            s = fastsel.score(model(x), y)
            w = sampler.weights(idx)
            assert w.shape == idx.shape and w.dtype == torch.float32 and not w.requires_grad
            (s.loss * w).mean().backward(); opt.step(); opt.zero_grad()
            sampler.update(idx, s)
            seen.append(idx)
        per_epoch.append(torch.cat(seen))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model did not train"
    # epoch 0 and the annealing epoch 7 (>= 0.875 E) visit everything once; epochs 1-6 prune
    for e in (0, E - 1):
        assert sorted(per_epoch[e].tolist()) == list(range(256))
    for e in range(1, E - 1):
        assert len(set(per_epoch[e].tolist())) == per_epoch[e].numel() < 256
    assert sampler.costs.trained == sum(p.numel() for p in per_epoch)
    assert sampler.table.seen().all()


def test_readme_epoch_mms_example_runs_end_to_end():
    """The README's epoch-style MMS: scores (with the head) from the training forward."""
    torch.manual_seed(0)
    train_set = toy_set(256)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = fastsel.Indexed(train_set)
    E = 3
    sampler = fastsel.ScoreSampler(data, fastsel.strategies.MMS(keep=0.3), batch_size=32, epochs=E, drop_last=False)
    visited = []
    for epoch in range(E):
        seen = []
        for x, y, idx in DataLoader(data, batch_sampler=sampler):
            s = fastsel.score(model(x), y, head=model.fc.weight)
            (s.loss * sampler.weights(idx)).mean().backward(); opt.step(); opt.zero_grad()
            sampler.update(idx, s)
            seen.append(idx)
        visited.append(torch.cat(seen))
    assert sorted(visited[0].tolist()) == list(range(256))  # nothing scored yet: a full epoch
    for e in (1, 2):
        assert len(set(visited[e].tolist())) == visited[e].numel() == round(0.3 * 256)
    assert sampler.costs.scored == 0 and sampler.costs.trained == sum(v.numel() for v in visited)


def test_readme_batch_selector_example_runs_end_to_end():
    torch.manual_seed(0)
    train_set = toy_set(1280)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    selector = fastsel.BatchSelector(model, fastsel.strategies.MMS(keep=64), head=model.fc)
    before = copy.deepcopy(model.state_dict())
    steps = 0
    for x, y in DataLoader(train_set, batch_size=640, shuffle=True):
        xb, yb, w = selector(x, y)
        assert xb.shape == (64, 8) and yb.shape == (64,) and w.shape == (64,)
        (fastsel.score(model(xb), yb).loss * w).mean().backward(); opt.step(); opt.zero_grad()
        steps += 1
    assert steps == 2
    assert selector.costs.as_dict() == {"scored": 1280, "trained": 128, "steps": 2}
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model did not train"


# ---------------------------------------------------------------- Indexed

def test_indexed_items_carry_their_index():
    ds = TensorDataset(torch.arange(10) * 10, torch.arange(10) % 3)
    data = fastsel.Indexed(ds)
    assert len(data) == 10
    assert data[4] == (torch.tensor(40), torch.tensor(1), 4)
    assert data[torch.tensor(7)][-1] == 7 and isinstance(data[torch.tensor(7)][-1], int)

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.tensor([i, i])

    x, i = fastsel.Indexed(Plain())[2]
    assert i == 2 and torch.equal(x, torch.tensor([2, 2]))
    xb, ib = next(iter(DataLoader(fastsel.Indexed(Plain()), batch_size=3)))
    assert ib.dtype == torch.int64 and ib.tolist() == [0, 1, 2]


class NoLen:
    def __getitem__(self, i):
        return torch.zeros(2), 0


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


@pytest.mark.parametrize("dataset", [NoLen(), Stream()], ids=["getitem-only", "iterable"])
def test_dataset_without_len_is_a_type_error_naming_the_length(dataset):
    with pytest.raises(TypeError, match="__len__"):
        fastsel.Indexed(dataset)
    with pytest.raises(TypeError, match="__len__"):
        fastsel.ScoreSampler(dataset, Uniform(), batch_size=2, epochs=1, drop_last=False)


def test_indexed_rejects_non_map_style():
    with pytest.raises(TypeError, match="__getitem__"):
        fastsel.Indexed(iter([1, 2, 3]))


# ---------------------------------------------------------------- epoch semantics

def test_uniform_every_index_once_per_epoch_new_order_each_epoch():
    n, bs = 53, 8
    sampler = fastsel.ScoreSampler(indexed(n), Uniform(budget=1.0), batch_size=bs, epochs=4, seed=3, drop_last=False)
    orders = []
    for e in range(4):
        length = len(sampler)
        batches = list(sampler)
        assert sampler.epoch == e
        assert length == len(batches) == math.ceil(n / bs)
        assert all(len(b) == bs for b in batches[:-1]) and len(batches[-1]) == n % bs
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n)), "every index exactly once"
        orders.append(flat)
    assert sampler.epoch == 3
    assert len({tuple(o) for o in orders}) == 4, "each epoch has its own order"


def test_iter_is_one_epoch_with_updates_and_a_dataloader():
    n = 40
    data = indexed(n)
    sampler = fastsel.ScoreSampler(data, Uniform(), batch_size=16, epochs=3, seed=0, drop_last=False)
    loader = DataLoader(data, batch_sampler=sampler)
    epochs = []
    for e in range(3):
        assert len(loader) == 3
        got = []
        for (_, idx) in loader:
            assert sampler.epoch == e
            sampler.update(idx, fake_scores(idx))
            got.append(idx.tolist())
        epochs.append(got)
        assert sorted(i for b in got for i in b) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.costs.steps == 9 and sampler.costs.trained == 3 * n


def test_same_seed_same_stream_other_seed_other_stream():
    def stream(seed, strategy_cls=InfoBatch):
        s = fastsel.ScoreSampler(indexed(60), strategy_cls(), batch_size=7, epochs=4, seed=seed, drop_last=False)
        return [run_epoch(s) for _ in range(4)]

    a, b, c = stream(5), stream(5), stream(6)
    assert a == b
    assert a != c
    assert stream(5, Uniform) == stream(5, Uniform) != stream(6, Uniform)


@pytest.mark.filterwarnings("ignore:ScoreSampler. no epoch of:UserWarning")  # tested in test_sampler_loop
@pytest.mark.parametrize("n,bs,expected", [(20, 6, [6, 6, 6]), (18, 6, [6, 6, 6]), (5, 6, [])])
def test_drop_last(n, bs, expected):
    sampler = fastsel.ScoreSampler(indexed(n), Uniform(), batch_size=bs, epochs=2, drop_last=True)
    for _ in range(2):
        assert len(sampler) == len(expected)
        batches = list(sampler)
        assert [len(b) for b in batches] == expected
        assert len(set(i for b in batches for i in b)) == sum(expected)
    keep = fastsel.ScoreSampler(indexed(n), Uniform(), batch_size=bs, epochs=1, drop_last=False)
    assert sum(len(b) for b in keep) == n


def test_len_matches_batches_for_pruned_epochs():
    sampler = fastsel.ScoreSampler(indexed(101), InfoBatch(), batch_size=10, epochs=8, seed=1, drop_last=False)
    lengths = []
    for epoch in range(8):
        expected = len(sampler)
        yielded = []
        for k, b in enumerate(sampler):
            if k == 2:
                assert len(sampler) == expected, "len() must not change inside an epoch"
            idx = torch.tensor(b)
            yielded.append(b)
            sampler.update(idx, fake_scores(idx, epoch))
        assert sampler.epoch == epoch + 1, "the update of an epoch's last batch ends the epoch"
        assert len(yielded) == expected
        lengths.append(expected)
    assert lengths[0] == lengths[7] == 11 and all(length < 11 for length in lengths[1:7])


def test_budget_fraction_of_uniform():
    sampler = fastsel.ScoreSampler(indexed(100), Uniform(budget=0.3), batch_size=8, epochs=3, seed=0, drop_last=False)
    epochs = [[i for b, _ in run_epoch(sampler) for i in b] for _ in range(3)]
    for ids in epochs:
        assert len(ids) == len(set(ids)) == 30
    assert set(epochs[0]) != set(epochs[1])


# ---------------------------------------------------------------- InfoBatch

@pytest.mark.parametrize("r", [0.5, 0.3])
def test_infobatch_prunes_below_mean_at_rate_r_with_rescaled_weights(r):
    n, E = 3000, 8
    sampler = fastsel.ScoreSampler(indexed(n), InfoBatch(prune_ratio=r), batch_size=250, epochs=E, seed=11, drop_last=False)
    epoch0 = run_epoch(sampler)
    assert sorted(i for b, _ in epoch0 for i in b) == list(range(n))
    assert all(w == 1.0 for _, ws in epoch0 for w in ws), "epoch 0: nothing scored yet, weight 1"
    expected_table = fake_losses(n, 0)
    for epoch in range(1, E):
        table_loss = sampler.table.values("loss").clone()
        torch.testing.assert_close(table_loss, expected_table)  # each sample's last visit's loss
        below = table_loss < table_loss.mean()
        visits = run_epoch(sampler)
        ids = torch.tensor([i for b, _ in visits for i in b])
        ws = torch.tensor([w for _, wb in visits for w in wb])
        assert ids.unique().numel() == ids.numel(), "no sample twice in an epoch"
        visited = torch.zeros(n, dtype=torch.bool)
        visited[ids] = True
        expected_table[ids] = fake_losses(n, epoch)[ids]
        if epoch < 0.875 * E:
            assert not (~visited & ~below).any(), "only below-mean samples may be pruned"
            pruned = int((~visited & below).sum())
            m = int(below.sum())
            assert 0.2 * n < m < 0.8 * n
            assert abs(pruned - r * m) <= 4.5 * math.sqrt(m * r * (1 - r)), (pruned, m, r)
            expect_w = torch.where(below[ids], torch.tensor(1 / (1 - r)), torch.tensor(1.0))
            torch.testing.assert_close(ws, expect_w)
        else:  # annealing: full data at weight 1
            assert visited.all()
            assert (ws == 1).all()


def test_infobatch_keeps_unscored_samples_at_weight_one():
    n = 400
    sampler = fastsel.ScoreSampler(indexed(n), InfoBatch(), batch_size=50, epochs=8, seed=2, drop_last=False)
    scored = []
    for i, b in enumerate(sampler):  # score only half of epoch 0
        if i % 2 == 0:
            idx = torch.tensor(b)
            sampler.update(idx, fake_scores(idx))
            scored += b
    unseen = torch.ones(n, dtype=torch.bool)
    unseen[scored] = False
    assert int(unseen.sum()) == n - len(scored) > 0
    assert (sampler.table.seen() == ~unseen).all()
    assert torch.isnan(sampler.table.values("loss")[unseen]).all()
    visits = run_epoch(sampler)
    ids = torch.tensor([i for b, _ in visits for i in b])
    ws = dict(zip(ids.tolist(), [w for _, wb in visits for w in wb]))
    for i in unseen.nonzero().squeeze(1).tolist():
        assert ws.get(i) == 1.0, f"unscored sample {i} must be kept at weight 1"


def test_infobatch_rejects_bad_parameters():
    for kw in ({"prune_ratio": 1.0}, {"prune_ratio": -0.1}, {"delta": 1.5}, {"delta": -0.1}):
        with pytest.raises(ValueError):
            InfoBatch(**kw)


# ---------------------------------------------------------------- ScoreTable

def test_score_table_records_last_running_mean_count_epoch():
    t = ScoreTable(6, ("loss", "p_wrong", "loss"))
    assert t.fields == ("loss", "p_wrong")
    assert torch.isnan(t.values("loss")).all() and (t.last_epoch == -1).all() and not t.seen().any()
    idx = torch.tensor([1, 4])
    s1 = fake_scores(idx, 0)
    t.update_values(idx, t.extract(s1), epoch=0)
    s2 = fake_scores(idx, 1)
    t.update_values(idx, t.extract(s2), epoch=3)
    torch.testing.assert_close(t.values("loss")[idx], s2.loss)
    torch.testing.assert_close(t.running_mean("loss")[idx], (s1.loss + s2.loss) / 2)
    torch.testing.assert_close(t.values("p_wrong")[idx], 1 - torch.exp(-s2.loss))
    assert t.count.tolist() == [0, 2, 0, 0, 2, 0]
    assert t.last_epoch.tolist() == [-1, 3, -1, -1, 3, -1]
    assert torch.isnan(t.running_mean("loss")[0])
    u = ScoreTable(6, ("loss", "p_wrong"))
    u.load_state_dict(t.state_dict())
    for f in u.fields:
        torch.testing.assert_close(u.values(f), t.values(f), equal_nan=True)
    assert torch.equal(u.count, t.count) and torch.equal(u.last_epoch, t.last_epoch)
    with pytest.raises(ValueError, match="unknown table fields"):
        ScoreTable(3, ("nope",))
    with pytest.raises(ValueError):
        ScoreTable(5, ("loss", "p_wrong")).load_state_dict(t.state_dict())


# ---------------------------------------------------------------- exact resume

N_RESUME, BS_RESUME, E_RESUME = 37, 8, 3


def make_sampler(n=N_RESUME):
    return fastsel.ScoreSampler(indexed(n), InfoBatch(prune_ratio=0.5), batch_size=BS_RESUME,
                                epochs=E_RESUME, seed=7, drop_last=False)


def train_steps(sampler, record, *, total, stop=None, on_start=None):
    """Iterates epochs until ``total`` updates in all, recording (batch, weights); returns
    the state_dict after ``stop`` updates (taken inside the loop, with the epoch's
    generator still open, as a checkpoint in a training loop would be)."""
    while sampler.costs.steps < total:
        for b in sampler:
            if on_start is not None:
                on_start(sampler)
                on_start = None
            idx = torch.tensor(b)
            record.append((b, sampler.weights(idx).tolist()))
            sampler.update(idx, fake_scores(idx, sampler.epoch))
            if sampler.costs.steps == stop:
                return sampler.state_dict()
            if sampler.costs.steps == total:
                break
    return None


def uninterrupted():
    s = make_sampler()
    record = []
    for _ in range(E_RESUME):
        for b in s:
            idx = torch.tensor(b)
            record.append((b, s.weights(idx).tolist()))
            s.update(idx, fake_scores(idx, s.epoch))
    return record, s


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)


def resume_and_finish(state, total):
    fresh = make_sampler()
    fresh.load_state_dict(roundtrip(state))
    rest = []
    train_steps(fresh, rest, total=total)
    return rest, fresh


def test_resume_at_every_stop_point_reproduces_the_stream():
    full, ref = uninterrupted()
    total = len(full)
    assert ref.costs.steps == total and total > 10
    epoch_ends = []
    s = make_sampler()
    for _ in range(E_RESUME):
        epoch_ends.append(len(run_epoch(s)) + (epoch_ends[-1] if epoch_ends else 0))
    assert epoch_ends[-1] == total
    for stop in range(1, total):
        rec = []
        state = train_steps(make_sampler(), rec, total=total, stop=stop)
        assert state is not None and rec == full[:stop]
        rest, fresh = resume_and_finish(state, total)
        assert rest == full[stop:], f"stream after resuming at update {stop} differs"
        assert fresh.costs.as_dict() == ref.costs.as_dict()
        torch.testing.assert_close(fresh.table.values("loss"), ref.table.values("loss"), equal_nan=True)
        assert torch.equal(fresh.table.count, ref.table.count)
    assert set(epoch_ends[:-1]) <= set(range(1, total)), "epoch ends are among the stop points"


def test_resume_before_any_update():
    full, _ = uninterrupted()
    # (a) a checkpoint of a sampler that was never iterated
    rest, _ = resume_and_finish(make_sampler().state_dict(), len(full))
    assert rest == full
    # (b) a checkpoint taken once the first epoch's generator has started, before any update
    states = []
    rec = []
    train_steps(make_sampler(), rec, total=1, on_start=lambda s: states.append(s.state_dict()))
    rest, _ = resume_and_finish(states[0], len(full))
    assert rest == full


def test_resume_after_an_exhausted_epoch_and_through_a_dataloader():
    full, _ = uninterrupted()
    s = make_sampler()
    data = s.data
    first = []
    for _, idx in DataLoader(data, batch_sampler=s):  # epoch 0 to its end, generator exhausted
        first.append((idx.tolist(), s.weights(idx).tolist()))
        s.update(idx, fake_scores(idx, s.epoch))
    state = roundtrip(s.state_dict())
    fresh = make_sampler()
    fresh.load_state_dict(state)
    rest = []
    while fresh.costs.steps < len(full):
        for _, idx in DataLoader(fresh.data, batch_sampler=fresh):
            rest.append((idx.tolist(), fresh.weights(idx).tolist()))
            fresh.update(idx, fake_scores(idx, fresh.epoch))
    assert first + rest == full


def test_resume_loop_by_epoch_counter_runs_the_planned_epochs():
    """A training loop resumes with ``for epoch in range(sampler.epoch, E)``; a checkpoint
    taken mid-epoch must then run exactly the remaining batches, no extra epoch."""
    full, _ = uninterrupted()
    rec = []
    state = train_steps(make_sampler(), rec, total=len(full), stop=3)
    fresh = make_sampler()
    fresh.load_state_dict(roundtrip(state))
    rest = []
    for _ in range(fresh.epoch, E_RESUME):
        for b in fresh:
            idx = torch.tensor(b)
            rest.append((b, fresh.weights(idx).tolist()))
            fresh.update(idx, fake_scores(idx, fresh.epoch))
    assert rec + rest == full


def test_resume_per_epoch_checkpoint_with_own_epoch_counter():
    """The usual loop: checkpoint (sampler state, next epoch) after each epoch."""
    full, _ = uninterrupted()
    for stop_epoch in range(1, E_RESUME):
        s = make_sampler()
        first = []
        for _ in range(stop_epoch):
            first += run_epoch(s)
        ckpt = roundtrip({"sampler": s.state_dict(), "epoch": stop_epoch})
        fresh = make_sampler()
        fresh.load_state_dict(ckpt["sampler"])
        rest = []
        for epoch in range(ckpt["epoch"], E_RESUME):
            rest += run_epoch(fresh)
            assert fresh.epoch == epoch + 1
        assert first + rest == full


def test_resume_loop_by_epoch_counter_at_an_epoch_boundary():
    full, _ = uninterrupted()
    s = make_sampler()
    first = run_epoch(s)
    state = roundtrip(s.state_dict())
    fresh = make_sampler()
    fresh.load_state_dict(state)
    rest = []
    for _ in range(fresh.epoch, E_RESUME):
        rest += run_epoch(fresh)
    assert first + rest == full


def test_load_state_dict_rejects_other_data_size():
    with pytest.raises(ValueError, match="samples"):
        make_sampler(n=N_RESUME + 1).load_state_dict(make_sampler().state_dict())


# ---------------------------------------------------------------- DataLoader workers

class Watched(fastsel.ScoreSampler):
    """Records when the epoch's generator has been run to its end."""

    def __iter__(self):
        self.generator_done = False
        yield from super().__iter__()
        self.generator_done = True


def loader_stream(num_workers: int, epochs: int = 3):
    n = 300
    data = fastsel.Indexed(toy_set(n))
    sampler = Watched(data, InfoBatch(), batch_size=16, epochs=epochs, seed=4)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers,
                        prefetch_factor=4 if num_workers else None)
    out, done_at_last = [], []
    for _ in range(epochs):
        batches = len(loader)
        for k, (x, y, idx) in enumerate(loader):
            torch.testing.assert_close(x, data.dataset.tensors[0][idx])
            if k == batches - 1:
                done_at_last.append(sampler.generator_done)
            out.append((idx.tolist(), sampler.weights(idx).tolist()))
            sampler.update(idx, fake_scores(idx, sampler.epoch))
    return out, sampler, done_at_last


def test_dataloader_workers_prefetch_gives_the_same_stream_and_weights():
    serial, s0, done0 = loader_stream(0)
    parallel, s2, done2 = loader_stream(2)
    assert done0 == [False] * 3
    assert done2 == [True] * 3, "with workers the sampler is exhausted before the last batches are trained"
    assert parallel == serial
    assert s2.costs.as_dict() == s0.costs.as_dict()
    assert any(w != 1.0 for _, ws in serial for w in ws), "the pruned epochs have rescaled weights"


# ---------------------------------------------------------------- bad input

@pytest.fixture
def started():
    sampler = fastsel.ScoreSampler(indexed(10), InfoBatch(), batch_size=4, epochs=3, drop_last=False)
    batch = torch.tensor(next(iter(sampler)))
    return sampler, batch


def test_update_out_of_range_indices(started):
    sampler, batch = started
    s = fake_scores(batch)
    for bad in ([0, 1, 2, 10], [0, 1, -1, 2]):
        with pytest.raises(IndexError, match=r"\[0, 10\)"):
            sampler.update(torch.tensor(bad), s)
    with pytest.raises(IndexError):
        sampler.weights(torch.tensor([10]))
    assert sampler.costs.steps == 0 and not sampler.table.seen().any(), "a rejected update changes nothing"


@pytest.mark.parametrize("bad", [
    lambda b: b.float(), lambda b: b.view(2, 2), lambda b: b.tolist(), lambda b: b.to(torch.uint8),
    lambda b: b[0],
], ids=["float", "2-D", "list", "uint8", "0-D"])
def test_update_wrong_index_dtype_or_shape(started, bad):
    sampler, batch = started
    with pytest.raises(ValueError, match="indices"):
        sampler.update(bad(batch), fake_scores(batch))
    with pytest.raises(ValueError, match="indices"):
        sampler.weights(bad(batch))


def test_update_accepts_int32_indices(started):
    sampler, batch = started
    sampler.update(batch.int(), fake_scores(batch))
    assert sampler.table.seen().sum() == 4 and sampler.costs.steps == 1


def test_update_scores_of_the_wrong_length(started):
    sampler, batch = started
    with pytest.raises(ValueError, match="samples"):
        sampler.update(batch[:3], fake_scores(batch))
    with pytest.raises(ValueError, match="samples"):
        sampler.update(batch, fake_scores(torch.cat([batch, batch])))
    with pytest.raises(TypeError, match="Scores"):
        sampler.update(batch, fake_scores(batch).loss.tolist())
    with pytest.raises(ValueError, match="samples"):
        sampler.update(batch, fake_scores(batch).loss[:3])  # a loss tensor is checked the same way
    assert sampler.costs.steps == 0


def test_update_scores_on_another_device(started):
    sampler, batch = started
    s = fake_scores(batch)
    meta = fastsel.Scores(*[None if t is None else t.to("meta") for t in s])
    with pytest.raises(ValueError, match="device|meta"):
        sampler.update(batch, meta)
    assert sampler.costs.steps == 0


def test_update_indices_on_another_device(started):
    sampler, batch = started
    with pytest.raises(ValueError, match="meta"):
        sampler.update(batch.to("meta"), fake_scores(batch))


def test_weights_before_iterating():
    sampler = fastsel.ScoreSampler(indexed(10), InfoBatch(), batch_size=4, epochs=3, drop_last=False)
    with pytest.raises(RuntimeError, match="iterate"):
        sampler.weights(torch.tensor([0, 1]))


def test_strategy_without_the_epoch_style():
    for strategy in (fastsel.strategies.MMS(keep=4), fastsel.strategies.HardLoss(keep=4)):
        with pytest.raises(StyleError, match="epoch"):
            fastsel.ScoreSampler(indexed(10), strategy, batch_size=4, epochs=2, drop_last=False)
    with pytest.raises(TypeError, match="Strategy"):
        fastsel.ScoreSampler(indexed(10), "infobatch", batch_size=4, epochs=2, drop_last=False)


@pytest.mark.parametrize("kw", [
    {"batch_size": 0}, {"batch_size": -3}, {"batch_size": 2.0}, {"batch_size": True}, {"batch_size": None},
    {"epochs": 0}, {"epochs": 1.5}, {"epochs": False},
    {"seed": -1}, {"seed": 0.5}, {"seed": "0"},
    {"num_replicas": 0}, {"num_replicas": 2, "rank": 2}, {"num_replicas": 2, "rank": -1},
])
def test_invalid_arguments(kw):
    args = {"batch_size": 4, "epochs": 2, **kw}
    name = list(kw)[-1]
    with pytest.raises(ValueError, match=name):
        fastsel.ScoreSampler(indexed(10), Uniform(), **args)


# ---------------------------------------------------------------- costs and hooks

def test_costs_and_hooks():
    sampler = fastsel.ScoreSampler(indexed(30), InfoBatch(), batch_size=8, epochs=4, seed=0, drop_last=False)
    seen = []
    sampler.add_hook(lambda stats: seen.append(dict(stats)))
    trained = steps = 0
    for epoch in range(4):
        for b in sampler:
            idx = torch.tensor(b)
            s = fake_scores(idx, epoch)
            sampler.update(idx, s)
            trained += len(b)
            steps += 1
            assert seen[-1] == sampler.stats
            assert seen[-1]["step"] == steps and seen[-1]["epoch"] == epoch
            assert seen[-1]["samples"] == len(b)
            assert seen[-1]["mean_loss"] == pytest.approx(float(s.loss.mean()), rel=1e-6)
    assert len(seen) == steps
    assert sampler.costs.as_dict() == {"scored": 0, "trained": trained, "steps": steps}
    assert trained < 4 * 30, "InfoBatch pruned some samples"
