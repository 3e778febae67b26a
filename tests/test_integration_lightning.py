"""accumopt inside Lightning against ``accumulate_grad_batches`` and one large batch.

Float64, a tiny token-level LightningModule, CPU. Lightning's own runs use a LambdaLR with
``interval="step"`` on the plain AdamW (stepped once per real update there); the accumopt runs
give the same LambdaLR to the wrapper (``scheduler=``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("lightning")
import lightning.pytorch as L  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from accumopt import AccumulatingOptimizer  # noqa: E402
from accumopt.integrations.lightning import AccumulationCallback, WeightedBackwardMixin  # noqa: E402

V, LEN, K, CLIP = 20, 6, 4, 0.05


def make_data(n: int, variable: bool, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n token sequences; variable: 1..LEN real targets, the rest -100 (padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, LEN + 1, (1,), generator=g)) if variable else LEN
        x, y = torch.randint(0, V, (LEN,), generator=g), torch.randint(0, V, (LEN,), generator=g)
        y[length:] = -100
        out.append((x, y))
    return out


def schedule(n: int) -> float:
    return 1.0 / (1 + n)


class Net(WeightedBackwardMixin, L.LightningModule):
    """Token classifier; ``k``: accumopt with K=k (weighted by tokens unless ``weighted=False``)."""

    def __init__(self, k: int | None = None, weighted: bool = True, mode: str = "inplace", interval=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(V, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, V)).double()
        self.k, self.weighted, self.mode, self.interval = k, weighted, mode, interval
        self.scheduler = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x).reshape(-1, V), y.reshape(-1), ignore_index=-100)  # token mean
        if self.k and self.weighted:
            self.set_micro_batch_weight((y != -100).sum())
        return loss

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        if not self.k:  # Lightning's own accumulation, or the large batch
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
            return {"optimizer": inner, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(inner, schedule)
        opt = AccumulatingOptimizer(inner, self.k, scheduler=self.scheduler, max_grad_norm=CLIP, mode=self.mode)
        if self.interval:  # misuse: Lightning steps a scheduler on the wrapper
            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}
        return opt


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (``state_dict``): it skips the batches already trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip = self.done = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.done = skip
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.skip = state["done"]


class CountAndSave(L.Callback):
    """Counts trained batches for the loader; at batch ``at``, saves a checkpoint and stops (a preempted job)."""

    def __init__(self, loader, at=None, path=None):
        self.loader, self.at, self.path, self.seen = loader, at, path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loader.done += 1
        self.seen += 1
        if self.seen == self.at:
            assert trainer.optimizers[0].pending == 2  # mid-window
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def fit(module, data, batch_size, callbacks=(), ckpt_path=None, loader=None, val_data=None, **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", 2)
    trainer = L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=list(callbacks),
                        num_sanity_val_steps=0, **trainer_kwargs)
    val = DataLoader(val_data, batch_size=3) if val_data is not None else None
    with warnings.catch_warnings():
        # Lightning 2.6's own pytree helper uses torch's deprecated LeafSpec (not our code, not a misuse).
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        trainer.fit(module, loader or DataLoader(data, batch_size=batch_size, shuffle=False), val,
                    ckpt_path=ckpt_path)
    return trainer


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def rel(a, b):
    fa, fb = flat(a), flat(b)
    return float((fa - fb).abs().max() / fb.abs().max())


def accumulating(k=K, **kwargs):
    return Net(k, **kwargs), [AccumulationCallback()]


def test_fixed_length_equals_lightning_accumulation():
    data = make_data(32, variable=False)  # 16 micro-batches per epoch: 4 windows of 4, 2 epochs
    ref = Net()
    ref_trainer = fit(ref, data, 2, accumulate_grad_batches=K, gradient_clip_val=CLIP)
    acc, callbacks = accumulating()
    trainer = fit(acc, data, 2, callbacks)
    opt = trainer.optimizers[0]
    assert rel(acc, Net()) > 1e-3  # it trained
    assert rel(acc, ref) <= 1e-12
    assert opt.num_updates == acc.scheduler.last_epoch == ref.scheduler.last_epoch == ref_trainer.global_step == 8


def test_variable_length_and_partial_window_equal_one_large_batch():
    data = make_data(36, variable=True)  # 18 micro-batches per epoch: windows 4, 4, 4, 4 and a partial 2
    big = Net()
    fit(big, data, 2 * K, gradient_clip_val=CLIP)
    acc, callbacks = accumulating()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(acc, data, 2, callbacks)
    assert [str(w.message) for w in caught] == []
    assert rel(acc, big) <= 1e-12
    assert trainer.optimizers[0].num_updates == acc.scheduler.last_epoch == big.scheduler.last_epoch == 10

    # Controls: Lightning's own accumulation (micro-batch means / K, the short last window / K too),
    # and accumopt without token weights.
    own = Net()
    fit(own, data, 2, accumulate_grad_batches=K, gradient_clip_val=CLIP)
    assert rel(own, big) > 1e-4
    unweighted, callbacks = accumulating(weighted=False)
    fit(unweighted, data, 2, callbacks)
    assert rel(unweighted, big) > 1e-4


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_mid_window_checkpoint_resumes_bitwise(tmp_path, mode):
    data = make_data(36, variable=True)
    full, callbacks = accumulating(mode=mode)
    loader = ResumableLoader(data, batch_size=2, shuffle=False)
    fit(full, data, 2, callbacks + [CountAndSave(loader)], loader=loader)

    path = str(tmp_path / "mid.ckpt")
    first, callbacks = accumulating(mode=mode)
    loader = ResumableLoader(data, batch_size=2, shuffle=False)
    fit(first, data, 2, callbacks + [CountAndSave(loader, at=24, path=path)], loader=loader)  # epoch 2, 2 pending

    resumed, callbacks = accumulating(mode=mode)
    loader = ResumableLoader(data, batch_size=2, shuffle=False)
    trainer = fit(resumed, data, 2, callbacks + [CountAndSave(loader)], loader=loader, ckpt_path=path)
    assert torch.equal(flat(resumed), flat(full))
    assert trainer.optimizers[0].num_updates == resumed.scheduler.last_epoch == 10


@pytest.mark.parametrize("trainer_kwargs, module_kwargs, message", [
    ({"accumulate_grad_batches": 2}, {}, r"accumulate_grad_batches=2\) with accumopt"),
    ({"gradient_clip_val": 1.0}, {}, r"gradient_clip_val=1.0\) with accumopt"),
    ({}, {"interval": "step"}, "interval='step' on an AccumulatingOptimizer"),
])
def test_misconfigurations_are_refused(trainer_kwargs, module_kwargs, message):
    module, callbacks = accumulating(**module_kwargs)
    with pytest.raises(ValueError, match=message):
        fit(module, make_data(8, variable=False), 2, callbacks, **trainer_kwargs)
    assert torch.equal(flat(module), flat(Net()))  # refused before any update


class ValNet(Net):
    """``Net`` with a validation set: records each validation run's loss and the window pending during it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_losses, self.val_pending = [], []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x).reshape(-1, V), y.reshape(-1), ignore_index=-100)
        self.val_losses[-1] += loss.detach()
        return loss

    def on_validation_epoch_start(self):
        self.val_losses.append(torch.zeros((), dtype=torch.float64))
        opt = self.trainer.optimizers[0]
        self.val_pending.append(opt.pending if isinstance(opt, AccumulatingOptimizer) else None)


def val_rel(a, b):
    va, vb = torch.stack(a.val_losses), torch.stack(b.val_losses)
    return float((va - vb).abs().max() / vb.abs().max())


VAL = make_data(6, variable=False, seed=9)


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_validation_mid_window_keeps_the_window(mode):
    # Lightning clears gradients before each validation run; val_check_interval=6 lands mid-window (6 = 4 + 2).
    data = make_data(32, variable=False)
    ref = ValNet()
    fit(ref, data, 2, accumulate_grad_batches=K, gradient_clip_val=CLIP, val_data=VAL, val_check_interval=6)
    acc = ValNet(K, mode=mode)
    trainer = fit(acc, data, 2, [AccumulationCallback()], val_data=VAL, val_check_interval=6)
    assert 2 in acc.val_pending  # validation did run with a pending window
    assert len(acc.val_losses) == len(ref.val_losses) == 4
    assert rel(acc, ref) <= 1e-12
    assert val_rel(acc, ref) <= 1e-12
    assert trainer.optimizers[0].num_updates == 8
    assert "on_validation_model_zero_grad" not in vars(acc)  # the module's own hook is back after fit

    # Variable lengths, token weights, a partial last window: the large batch (validation changes nothing).
    data = make_data(36, variable=True)
    big = Net()
    fit(big, data, 2 * K, gradient_clip_val=CLIP)
    acc = ValNet(K, mode=mode)
    fit(acc, data, 2, [AccumulationCallback()], val_data=VAL, val_check_interval=7)
    assert 3 in acc.val_pending  # 7 = 4 + 3
    assert rel(acc, big) <= 1e-12


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_epoch_end_validation_sees_the_partial_window(mode):
    # 18 micro-batches per epoch: windows 4, 4, 4, 4 and a partial 2, applied before the epoch-end validation.
    data = make_data(36, variable=True)
    big = ValNet()
    fit(big, data, 2 * K, gradient_clip_val=CLIP, val_data=VAL)
    acc = ValNet(K, mode=mode)
    trainer = fit(acc, data, 2, [AccumulationCallback()], val_data=VAL)
    assert acc.val_pending == [0, 0]
    assert rel(acc, big) <= 1e-12
    assert val_rel(acc, big) <= 1e-12
    assert trainer.optimizers[0].num_updates == 10

    # Fixed lengths, whole windows: Lightning's own accumulation validates the same parameters.
    data = make_data(32, variable=False)
    own = ValNet()
    fit(own, data, 2, accumulate_grad_batches=K, gradient_clip_val=CLIP, val_data=VAL)
    acc = ValNet(K, mode=mode)
    fit(acc, data, 2, [AccumulationCallback()], val_data=VAL)
    assert len(acc.val_losses) == 2 and val_rel(acc, own) <= 1e-12


def test_validation_without_a_window_clears_gradients():
    # Nothing pending (the window closed on the batch before validation): Lightning's own hook runs.
    data = make_data(32, variable=False)
    acc = ValNet(K)
    seen = []

    class Probe(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen.append([p.grad is None for p in pl_module.parameters()])

    fit(acc, data, 2, [AccumulationCallback(), Probe()], val_data=VAL, val_check_interval=4)
    assert acc.val_pending == [0] * len(acc.val_pending) and len(seen) == 8
    assert all(all(cleared) for cleared in seen)


class ManualValNet(ValNet):
    """``ValNet`` with manual optimization: the training step calls the wrapper itself."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        opt.zero_grad()
        return loss


def test_manual_optimization_keeps_the_window_through_validation():
    data = make_data(32, variable=False)
    ref = ValNet()
    fit(ref, data, 2, accumulate_grad_batches=K, gradient_clip_val=CLIP, val_data=VAL, val_check_interval=6)
    acc = ManualValNet(K)
    fit(acc, data, 2, [AccumulationCallback()], val_data=VAL, val_check_interval=6)
    assert 2 in acc.val_pending
    assert rel(acc, ref) <= 1e-12
    assert val_rel(acc, ref) <= 1e-12


def test_windows_spanning_epochs_survive_validation():
    # flush_on_epoch_end=False: 18 micro-batches per epoch, so the epoch-end validation finds 2 pending;
    # the two epochs are the large batch's one epoch over the data twice (9 windows of 4).
    data = make_data(36, variable=True)
    big = Net()
    fit(big, data + data, 2 * K, gradient_clip_val=CLIP, max_epochs=1)
    acc = ValNet(K)
    trainer = fit(acc, data, 2, [AccumulationCallback(flush_on_epoch_end=False)], val_data=VAL)
    assert acc.val_pending == [2, 0]
    assert rel(acc, big) <= 1e-12
    assert trainer.optimizers[0].num_updates == 9


class EpochSchedulerNet(Net):
    """An ``interval="epoch"`` LambdaLR from ``configure_optimizers`` (on the wrapper for accumopt)."""

    def configure_optimizers(self):
        inner = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        opt = AccumulatingOptimizer(inner, self.k, max_grad_norm=CLIP, mode=self.mode) if self.k else inner
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                   "interval": "epoch"}}


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
def test_partial_window_uses_the_epochs_learning_rate(mode):
    # The partial last window is applied before Lightning steps the epoch scheduler, as the large batch's last step.
    data = make_data(36, variable=True)
    big = EpochSchedulerNet()
    fit(big, data, 2 * K, gradient_clip_val=CLIP)
    acc = EpochSchedulerNet(K, mode=mode)
    trainer = fit(acc, data, 2, [AccumulationCallback()])
    assert rel(acc, big) <= 1e-12
    assert trainer.optimizers[0].num_updates == 10
    assert "optimizer_step" not in vars(acc)


def test_module_hooks_restored_after_an_exception():
    class Failing(Net):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("failing micro-batch")
            return super().training_step(batch, batch_idx)

    module = Failing(K)
    with pytest.raises(RuntimeError, match="failing micro-batch"):
        fit(module, make_data(16, variable=False), 2, [AccumulationCallback()])
    assert "optimizer_step" not in vars(module) and "on_validation_model_zero_grad" not in vars(module)
    opt = module.trainer.optimizers[0]
    assert opt.pending  # the failing micro-batch interrupted a window: dropped here on purpose
    opt.discard()
