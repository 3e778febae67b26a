"""``AccumulatingTrainer`` against the Hugging Face Trainer's own accumulation and one large batch.

Float64 on a tiny random-init GPT-2 (no downloads), CPU. The loss is the causal-LM token
mean computed in float64 (``compute_loss_func``): transformers' built-in loss casts the
logits to float32, which would limit every comparison to float32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from accumopt import AccumulatingOptimizer  # noqa: E402
from accumopt.integrations.transformers import AccumulatingTrainer  # noqa: E402

L = 8  # sequence length (padded)
K = 4
CONFIG = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=L,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def make_data(n: int, variable: bool, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """n sequences of length L; variable: 2..L real tokens, right-padded, labels -100 on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, L + 1, (1,), generator=g)) if variable else L
        ids = torch.randint(0, 50, (L,), generator=g)
        mask = (torch.arange(L) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def make_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**CONFIG)).double()


def token_loss(outputs, labels, num_items_in_batch=None):
    """Sum of the shifted token cross-entropies / num_items_in_batch, in float64."""
    logits, target = outputs.logits[..., :-1, :], labels[..., 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total / num_items_in_batch


def training_args(out: str, **overrides) -> TrainingArguments:
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, num_train_epochs=2, learning_rate=1e-2,
                  weight_decay=0.1, max_grad_norm=0.05, warmup_steps=1, lr_scheduler_type="linear",
                  report_to="none", disable_tqdm=True, logging_strategy="no", save_strategy="no",
                  use_cpu=True, seed=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    fa, fb = flat(a), flat(b)
    return float((fa - fb).abs().max() / fb.abs().max())


def train(cls, data, out, callbacks=(), resume=None, **overrides):
    model = make_model()
    trainer = cls(model=model, args=training_args(out, **overrides), train_dataset=data,
                  compute_loss_func=token_loss, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


class Record(TrainerCallback):
    """global_step and LR at every on_step_end, and the logged losses."""

    def __init__(self):
        self.steps, self.lrs, self.losses = [], [], []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.steps.append(state.global_step)
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_fixed_length_equals_trainer_accumulation(tmp_path):
    # 28 samples / micro-batches of 2 = 14 per epoch: windows 4, 4, 4 and a partial 2; 2 epochs, clipping active.
    data = make_data(28, variable=False)
    ref, ref_trainer = train(Trainer, data, tmp_path / "ref", gradient_accumulation_steps=K)
    acc, trainer = train(AccumulatingTrainer, data, tmp_path / "acc", gradient_accumulation_steps=K)
    opt = trainer.accumulating_optimizer
    assert rel(acc, make_model()) > 1e-2  # it trained
    assert rel(acc, ref) <= 1e-12
    assert trainer.state.global_step == ref_trainer.state.global_step == opt.num_updates == 8
    assert trainer.lr_scheduler.scheduler.last_epoch == 8


class FetchSpy(AccumulatingTrainer):
    """Records how many batches the Trainer fetches at once (its own accumulation fetches a whole window)."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        self.fetched = getattr(self, "fetched", []) + [num_batches]
        return super().get_batch_samples(epoch_iterator, num_batches, device)


def test_variable_length_equals_one_large_batch(tmp_path):
    data = make_data(28, variable=True)
    big, _ = train(Trainer, data, tmp_path / "big", per_device_train_batch_size=2 * K)
    acc, trainer = train(FetchSpy, data, tmp_path / "acc", gradient_accumulation_steps=K)
    assert rel(acc, big) <= 1e-12
    assert set(trainer.fetched) == {1} and len(trainer.fetched) == 28  # one micro-batch at a time, no prefetch
    assert trainer.state.global_step == trainer.accumulating_optimizer.num_updates == 8

    # Control: each micro-batch's own token mean, averaged over the window (no token counts).
    model = make_model()
    naive = Trainer(model=model, args=training_args(tmp_path / "naive", gradient_accumulation_steps=K),
                    train_dataset=data)
    naive.model_accepts_loss_kwargs = False
    naive.train()
    assert rel(model, big) > 1e-6


def test_scheduler_logging_and_global_step_per_update_without_warnings(tmp_path):
    data = make_data(28, variable=True)
    logging = dict(logging_strategy="steps", logging_steps=1)
    big_rec, acc_rec = Record(), Record()
    train(Trainer, data, tmp_path / "big", [big_rec], per_device_train_batch_size=2 * K, **logging)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = train(AccumulatingTrainer, data, tmp_path / "acc", [acc_rec],
                           gradient_accumulation_steps=K, **logging)
    assert [str(w.message) for w in caught] == []
    assert acc_rec.steps == big_rec.steps == list(range(1, 9))  # on_step_end once per real update
    assert acc_rec.lrs == big_rec.lrs  # the schedule, in updates
    assert len(acc_rec.losses) == 8  # one log per update: the window's token mean
    assert acc_rec.losses == pytest.approx(big_rec.losses, rel=1e-12)
    assert trainer.lr_scheduler.scheduler.last_epoch == trainer.accumulating_optimizer.num_updates == 8


class SaveAndStop(TrainerCallback):
    """Save a checkpoint after micro-batch ``at`` (mid-window) and stop, as a preempted job would."""

    def __init__(self, at: int):
        self.at, self.seen = at, 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.seen += 1
        if self.seen == self.at:
            control.should_save = control.should_training_stop = True


def test_mid_window_checkpoint_resumes_bitwise(tmp_path):
    data = make_data(28, variable=True)
    full, full_trainer = train(AccumulatingTrainer, data, tmp_path / "full", gradient_accumulation_steps=K)
    # Micro-batches 1-4 close update 1; substep 5 is the 2nd micro-batch of window 2: 2 pending.
    _, first = train(AccumulatingTrainer, data, tmp_path / "run", [SaveAndStop(5)], gradient_accumulation_steps=K)
    assert first.accumulating_optimizer.pending == 2 and first.state.global_step == 1
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert checkpoint.is_dir()
    resumed, second = train(AccumulatingTrainer, data, tmp_path / "run", resume=str(checkpoint),
                            gradient_accumulation_steps=K)
    assert torch.equal(flat(resumed), flat(full))
    assert second.state.global_step == full_trainer.state.global_step == 8
    assert second.lr_scheduler.scheduler.last_epoch == 8


def test_user_optimizer_and_scheduler_and_refusals(tmp_path):
    data = make_data(12, variable=True)
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda n: 1.0 / (n + 1))
    trainer = AccumulatingTrainer(model=model, args=training_args(tmp_path, num_train_epochs=1), train_dataset=data,
                                  compute_loss_func=token_loss, optimizers=(inner, sched), accumulation_steps=K)
    trainer.train()  # 6 micro-batches: windows of 4 and 2
    assert trainer.accumulating_optimizer.optimizer is inner
    assert sched.last_epoch == trainer.accumulating_optimizer.num_updates == trainer.state.global_step == 2

    with pytest.raises(TypeError, match="expected the plain torch optimizer"):
        AccumulatingTrainer(model=model, args=training_args(tmp_path),
                            optimizers=(AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), K), None))
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 2 with TrainingArguments"):
        AccumulatingTrainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=K),
                            accumulation_steps=2)
    with pytest.raises(ValueError, match="'mode' is set by AccumulatingTrainer"):
        AccumulatingTrainer(model=model, args=training_args(tmp_path), accumulation_kwargs={"mode": "inplace"})


def test_import_accumopt_imports_no_framework():
    code = ("import sys, accumopt, accumopt.integrations; "
            "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning', 'accelerate') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_naive_trainer_setup_raises_or_warns(tmp_path, mode):
    """``Trainer(optimizers=(AccumulatingOptimizer(...), LambdaLR(...)))`` with the Trainer's accumulation off.

    The Trainer calls ``model.zero_grad()`` after every optimizer step and steps the scheduler on every
    micro-batch: in-place mode loses the window (raises at the second micro-batch); in buffered mode the
    sums survive, and the scheduler running K times too fast is reported.
    """
    from accumopt.misuse import MisuseWarning

    data = make_data(24, variable=False)
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), K, mode=mode)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: max(0.0, 1.0 - n / 12))
    trainer = Trainer(model=model, args=training_args(tmp_path, gradient_accumulation_steps=1, num_train_epochs=1),
                      train_dataset=data, compute_loss_func=token_loss, optimizers=(opt, sched))
    if mode == "inplace":
        with pytest.raises(RuntimeError, match=r"window was lost.*model\.zero_grad\(\).*Hugging Face Trainer"):
            trainer.train()
        assert opt.num_updates == 0
    else:
        with pytest.warns(MisuseWarning, match="K times too fast"):
            trainer.train()
    opt.discard()
