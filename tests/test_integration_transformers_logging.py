"""``AccumulatingTrainer`` logs ``grad_norm`` per real update, as the Trainer's own accumulation does.

Float64 tiny GPT-2 on the CPU, with the helpers of ``test_integration_transformers``.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, os.path.dirname(__file__))
from test_integration_transformers import K, make_data, make_model, rel, token_loss, train, training_args  # noqa: E402,E501
from transformers import Trainer, TrainerCallback  # noqa: E402

from accumopt.integrations.transformers import AccumulatingTrainer  # noqa: E402

LOG_EVERY_UPDATE = dict(logging_strategy="steps", logging_steps=1)


class GradNorms(TrainerCallback):
    """The logged ``grad_norm`` values (None where a log record has none)."""

    def __init__(self):
        self.norms = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.norms.append(logs.get("grad_norm"))


class NormSpy(AccumulatingTrainer):
    """Records what ``_get_grad_norm`` hands the Trainer on each micro-batch."""

    def _get_grad_norm(self, model, grad_norm=None):
        out = super()._get_grad_norm(model, grad_norm)
        self.handed = getattr(self, "handed", []) + [out]
        return out


def relative(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("max_grad_norm", [0.05, 0.0])
def test_grad_norm_equals_trainer_accumulation(tmp_path, max_grad_norm):
    # 14 micro-batches per epoch: windows 4, 4, 4 and a partial 2; 2 epochs, 8 updates.
    data = make_data(28, variable=False)
    ref_log, acc_log = GradNorms(), GradNorms()
    ref, _ = train(Trainer, data, tmp_path / "ref", [ref_log], gradient_accumulation_steps=K,
                   max_grad_norm=max_grad_norm, **LOG_EVERY_UPDATE)
    acc, trainer = train(NormSpy, data, tmp_path / "acc", [acc_log], gradient_accumulation_steps=K,
                         max_grad_norm=max_grad_norm, **LOG_EVERY_UPDATE)
    assert rel(acc, ref) <= 1e-12
    assert len(acc_log.norms) == len(ref_log.norms) == 8
    assert None not in ref_log.norms and None not in acc_log.norms
    assert len(set(ref_log.norms)) == 8  # distinct norms: a stale or shifted one would not match
    assert relative(acc_log.norms, ref_log.norms) <= 1e-12
    assert float(trainer.accumulating_optimizer.last_grad_norm) == acc_log.norms[-1]
    # A device tensor on the micro-batch that closes a window (read only by the Trainer's logging), else None.
    tensors = [h for h in trainer.handed if h is not None]
    assert len(trainer.handed) == 28 and len(tensors) == 8
    assert all(isinstance(h, torch.Tensor) and h.dim() == 0 for h in tensors)


def test_grad_norm_equals_one_large_batch_with_token_weights(tmp_path):
    data = make_data(28, variable=True)
    big_log, acc_log = GradNorms(), GradNorms()
    big, _ = train(Trainer, data, tmp_path / "big", [big_log], per_device_train_batch_size=2 * K, **LOG_EVERY_UPDATE)
    acc, _ = train(AccumulatingTrainer, data, tmp_path / "acc", [acc_log], gradient_accumulation_steps=K,
                   **LOG_EVERY_UPDATE)
    assert rel(acc, big) <= 1e-12
    assert len(acc_log.norms) == len(big_log.norms) == 8
    assert relative(acc_log.norms, big_log.norms) <= 1e-12


def test_no_grad_norm_when_not_tracked(tmp_path):
    data = make_data(12, variable=False)
    log = GradNorms()
    args = training_args(tmp_path / "acc", gradient_accumulation_steps=K, max_grad_norm=0.0, num_train_epochs=1,
                         **LOG_EVERY_UPDATE)
    trainer = AccumulatingTrainer(model=make_model(), args=args, train_dataset=data, compute_loss_func=token_loss,
                                  callbacks=[log], accumulation_kwargs={"track_grad_norm": False})
    trainer.train()
    assert log.norms == [None, None]
    assert trainer.accumulating_optimizer.last_grad_norm is None
    assert not any(isinstance(n, float) and math.isnan(n) for n in log.norms)
