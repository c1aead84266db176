"""``fastsel.integrations.hf.SelectionTrainer`` with a real (tiny, randomly initialised)
Hugging Face model on the CPU: the sampler's batches and weights drive the Trainer, the
run has the sampler's epochs, the schedule follows the run's progress, and a Trainer
checkpoint resumes the selection and the model exactly."""

from __future__ import annotations

import pytest
import torch

import fastsel
from fastsel.strategies import InfoBatch, Uniform

transformers = pytest.importorskip("transformers")
from fastsel.integrations.hf import INDEX_KEY, SAMPLER_STATE_NAME, SelectionTrainer  # noqa: E402

N, L, V, C, B, E = 48, 6, 20, 3, 8, 3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=N):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, V, (n, L), generator=g)
        self.labels = (self.ids[:, 0] % C)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(L, dtype=torch.long),
                "labels": int(self.labels[i])}


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=C,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class Recording(SelectionTrainer):
    """Records each training batch's indices and weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if INDEX_KEY in inputs:
            idx = inputs[INDEX_KEY]
            self.seen.append((self.sampler.epoch, idx.tolist(), self.sampler.weights(idx).tolist()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=B, learning_rate=5e-3, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
                lr_scheduler_type="linear", disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _sampler(data, strategy=None):
    return fastsel.ScoreSampler(fastsel.Indexed(data), strategy or InfoBatch(prune_ratio=0.5), batch_size=B,
                                epochs=E, seed=1)


def test_a_run_follows_the_sampler(tmp_path):
    data = Tokens()
    sampler = _sampler(data)
    trainer = Recording(model=_model(), args=_args(tmp_path), train_dataset=data, sampler=sampler)
    trainer.train()
    assert sampler.epoch == E and trainer.state.global_step == sampler.costs.steps == len(trainer.seen)
    per_epoch = [sum(len(i) for e, i, _ in trainer.seen if e == k) for k in range(E)]
    assert per_epoch[0] == N and per_epoch[1] < N  # InfoBatch pruned epoch 1
    assert all(len(i) == B for _, i, _ in trainer.seen)
    assert any(max(w) > 1 for _, _, w in trainer.seen)  # kept below-mean samples reweighted
    assert trainer.state.max_steps == sampler.planned_steps() == E * (N // B)
    # the schedule followed the run's progress: the linear decay ended at 0 with fewer steps than planned
    assert trainer.state.global_step < trainer.state.max_steps
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_steps_schedule_keeps_the_trainers(tmp_path):
    data = Tokens()
    sampler = _sampler(data)
    trainer = SelectionTrainer(model=_model(), args=_args(tmp_path), train_dataset=data, sampler=sampler,
                               schedule="steps")
    trainer.train()
    left = 1 - trainer.state.global_step / trainer.state.max_steps
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * left, rel=1e-6)


@pytest.mark.parametrize("cut", [7, 10])
def test_resume_from_a_trainer_checkpoint(tmp_path, cut):
    """Cut in the middle of epoch 1, and at the end of epoch 1 (6 + 4 batches), where the
    Trainer, counting 6 batches an epoch, believes only one epoch done."""
    data = Tokens()
    full = Recording(model=_model(), args=_args(tmp_path / "full"), train_dataset=data, sampler=_sampler(data))
    full.train()

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == cut:
                control.should_save = True
                control.should_training_stop = True
            return control

    out = tmp_path / "cut"
    first = Recording(model=_model(), args=_args(out), train_dataset=data, sampler=_sampler(data),
                      callbacks=[StopAt()])
    first.train()
    assert [sum(1 for e, _, _ in full.seen if e == k) for k in range(E)] == [6, 4, 4]
    assert (out / f"checkpoint-{cut}" / SAMPLER_STATE_NAME).is_file()
    second = Recording(model=_model(), args=_args(out), train_dataset=data, sampler=_sampler(data))
    second.train(resume_from_checkpoint=True)
    assert first.seen + second.seen == full.seen
    assert second.sampler.epoch == E and second.state.global_step == full.state.global_step
    for a, b in zip(second.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_setups_are_refused(tmp_path):
    data = Tokens()
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        SelectionTrainer(model=_model(), args=_args(tmp_path, per_device_train_batch_size=4), train_dataset=data,
                         sampler=_sampler(data))
    with pytest.raises(ValueError, match="over 40 samples"):
        SelectionTrainer(model=_model(), args=_args(tmp_path), train_dataset=data,
                         sampler=_sampler(Tokens(40)))
    with pytest.raises(TypeError, match="ScoreSampler"):
        SelectionTrainer(model=_model(), args=_args(tmp_path), train_dataset=data, sampler=object())
    with pytest.raises(ValueError, match="schedule"):
        SelectionTrainer(model=_model(), args=_args(tmp_path), train_dataset=data, sampler=_sampler(data),
                         schedule="cosine")
    trainer = SelectionTrainer(model=_model(), args=_args(tmp_path, max_steps=3), train_dataset=data,
                               sampler=_sampler(data, Uniform()))
    with pytest.raises(ValueError, match="leave max_steps at -1"):
        trainer.train()
    (tmp_path / "checkpoint-1").mkdir()
    trainer = SelectionTrainer(model=_model(), args=_args(tmp_path), train_dataset=data, sampler=_sampler(data))
    with pytest.raises(FileNotFoundError, match="no sampler state"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_gradient_accumulation_needs_epochs_of_known_length(tmp_path):
    data = Tokens()
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2 needs epochs of known length.*InfoBatch"):
        SelectionTrainer(model=_model(), args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=data,
                         sampler=_sampler(data))
    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = SelectionTrainer(model=_model(), args=args, train_dataset=data, sampler=_sampler(data, Uniform()))
    trainer.train()
    assert trainer.sampler.costs.steps == E * N // B and trainer.state.global_step == E * N // B // 2
    assert args.max_steps == -1 and args.num_train_epochs == 3.0 and not args.ignore_data_skip  # the caller's args
