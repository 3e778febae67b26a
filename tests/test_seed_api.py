"""The seed document's usage examples and configuration snippets, run as written, and every field's effect.

References are independent: plain torch optimizers on the large batch (float64), hand-written
gradient arithmetic, or torch.nn.utils clipping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.utils.data as data

from accumopt import (AccumulationMode, AccumulationState, AccumulationStrategy, AdaptiveK,
                      GradientAccumulationConfig, GradientAccumulationTrainer, GradientAccumulator, MicroBatcher)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_dataset(n: int = 128, features: int = 784, classes: int = 10, seed: int = 0) -> data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64).to(torch.get_default_dtype())
    teacher = torch.randn(features, classes, generator=g, dtype=torch.float64).to(x.dtype)
    return data.TensorDataset(x, (x @ teacher).argmax(1))


def max_rel(a, b) -> float:
    return max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item() for p, q in zip(a, b))


def losses(trainer) -> list[float]:
    return [h["epoch_loss"] for h in trainer.training_history]


# ------------------------------------------------------------------ usage examples, as written
def test_basic_example_trains_and_equals_large_batch(f64):
    dataset = make_dataset()
    torch.manual_seed(1)
    # --- the seed's "Basic Gradient Accumulation", verbatim ---
    config = GradientAccumulationConfig(
        accumulation_steps=4,
        mode=AccumulationMode.STANDARD,
        strategy=AccumulationStrategy.UNIFORM,
        effective_batch_size=16,
        target_batch_size=64,
        gradient_scaling=True,
        loss_scaling=True
    )
    trainer = GradientAccumulationTrainer(config)
    model = nn.Sequential(nn.Linear(784, 10))
    optimizer = torch.optim.Adam(model.parameters())
    criterion = nn.CrossEntropyLoss()
    trainer.setup_training(model, optimizer, criterion)
    train_loader = data.DataLoader(dataset, batch_size=16, shuffle=True)
    trainer.train(train_loader, num_epochs=10)
    # ---
    assert losses(trainer)[-1] < 0.8 * losses(trainer)[0]
    torch.manual_seed(1)
    ref_model = nn.Sequential(nn.Linear(784, 10))
    ref = reference_run_seeded(ref_model, dataset, 64, 10)
    assert max_rel(list(model.parameters()), ref) < 1e-12


def reference_run_seeded(model, dataset, batch_size, epochs, **kw):
    # The model was just built right after torch.manual_seed(1); the loader's permutation comes next,
    # exactly as in the trainer run (where the model was also built after the seed).
    kw2 = dict(kw)
    opt = torch.optim.Adam(model.parameters(), **({"lr": kw2.pop("lr")} if "lr" in kw2 else {}))
    clip = kw2.pop("clip", None)
    lrs = iter(kw2.pop("lrs", ()))
    step_size = kw2.pop("scheduler_step", None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size) if step_size else None
    loader = data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            lr = next(lrs, None)
            if lr is not None:  # an LR sequence given (ADAPTIVE + progressive_scaling): impose it
                saved = opt.param_groups[0]["lr"]
                opt.param_groups[0]["lr"] = lr
            opt.step()
            if lr is not None:
                opt.param_groups[0]["lr"] = saved
            if sched is not None:
                sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_advanced_example_warns_unused_layer_weights_trains_and_equals_large_batch(f64):
    dataset = make_dataset(n=96)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="layer_accumulation_weights has no effect"):
        config = GradientAccumulationConfig(
            accumulation_steps=8,
            mode=AccumulationMode.ADAPTIVE,
            strategy=AccumulationStrategy.MEMORY_AWARE,
            effective_batch_size=32,
            target_batch_size=256,
            memory_threshold=0.8,
            memory_monitoring=True,
            adaptive_scaling=True,
            progressive_scaling=True,
            gradient_clipping=True,
            clipping_norm=1.0,
            nan_handling=True,
            layer_accumulation_weights={
                'conv1.weight': 1.0,
                'conv2.weight': 0.8,
                'fc1.weight': 0.6,
                'fc2.weight': 0.4
            }
        )
    trainer = GradientAccumulationTrainer(config)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    criterion = nn.CrossEntropyLoss()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    trainer.setup_training(model, optimizer, criterion, scheduler)
    seen_lr = []  # registered after the accumulator's LR hook: sees the LR of each update
    optimizer.register_step_pre_hook(lambda o, a, k: seen_lr.append(o.param_groups[0]["lr"]))
    train_loader = data.DataLoader(dataset, batch_size=32, shuffle=True)
    trainer.train(train_loader, num_epochs=10)
    assert losses(trainer)[-1] < 0.5 * losses(trainer)[0]
    # ADAPTIVE: AdaptiveK moved K with the noise scale, and progressive_scaling scaled the LR by sqrt(K / 8)
    # on top of StepLR (0.001, x0.1 every 5 updates).
    assert isinstance(trainer.accumulator.adaptive, AdaptiveK)
    factors = [lr / (0.001 * 0.1 ** (i // 5)) for i, lr in enumerate(seen_lr)]
    assert len(factors) == 10 and all(any(abs(f - math.sqrt(2 ** j / 8)) < 1e-12 for j in range(7)) for f in factors)
    # 96 samples per epoch: one partial window (3 of 8 micro-batches) flushed per epoch = one large batch.
    assert [h["optimization_steps"] for h in trainer.training_history] == [1] * 10
    assert len(trainer.accumulator.state.memory_usage) == 10  # memory_monitoring: one reading per update
    torch.manual_seed(1)
    ref_model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    ref = reference_run_seeded(ref_model, dataset, 256, 10, lr=0.001, clip=1.0, scheduler_step=5, lrs=seen_lr)
    assert max_rel(list(model.parameters()), ref) < 1e-11  # measured 2e-13 (Adam over 10 updates, K moving)


def test_progressive_example_follows_schedule_and_trains():
    dataset = make_dataset(n=256)
    torch.manual_seed(1)
    config = GradientAccumulationConfig(
        mode=AccumulationMode.PROGRESSIVE,
        strategy=AccumulationStrategy.ADAPTIVE_LAYERS,
        accumulation_schedule=[2, 4, 8, 16, 32],
        progressive_scaling=True,
        adaptive_scaling=True,
        gradient_scaling=True,
        loss_scaling=True
    )
    trainer = GradientAccumulationTrainer(config)
    model = nn.Sequential(nn.Linear(784, 10))
    optimizer = torch.optim.Adam(model.parameters())
    criterion = nn.CrossEntropyLoss()
    trainer.setup_training(model, optimizer, criterion)
    train_loader = data.DataLoader(dataset, batch_size=16, shuffle=True)
    trainer.train(train_loader, num_epochs=10)
    hist = trainer.training_history
    assert [h["accumulation_steps"] for h in hist] == [2, 4, 8, 16, 32, 32, 32, 32, 32, 32]
    # 16 micro-batches per epoch: 8, 4, 2, 1 full windows, then one flushed partial window of 16.
    assert [h["optimization_steps"] for h in hist] == [8, 4, 2, 1] + [1] * 6
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_memory_aware_example_trains_and_equals_large_batch(f64):
    dataset = make_dataset()
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="mode=EFFICIENT with strategy=MEMORY_AWARE accumulates in buffers"):
        config = GradientAccumulationConfig(
            mode=AccumulationMode.EFFICIENT,
            strategy=AccumulationStrategy.MEMORY_AWARE,
            accumulation_steps=4,
            memory_threshold=0.8,
            memory_monitoring=True,
            adaptive_scaling=True,
            gradient_clipping=True,
            clipping_norm=1.0,
            nan_handling=True
        )
    trainer = GradientAccumulationTrainer(config)
    model = nn.Sequential(nn.Linear(784, 10))
    optimizer = torch.optim.Adam(model.parameters())
    criterion = nn.CrossEntropyLoss()
    trainer.setup_training(model, optimizer, criterion)
    train_loader = data.DataLoader(dataset, batch_size=16, shuffle=True)
    trainer.train(train_loader, num_epochs=10)
    assert losses(trainer)[-1] < 0.8 * losses(trainer)[0]
    # MEMORY_AWARE runs each window through MicroBatcher, which needs buffers (documented fallback).
    assert config.storage == "buffered" and trainer.optimizer.stats()["buffer_bytes"] > 0
    assert isinstance(trainer.accumulator.batcher, MicroBatcher) and trainer.accumulator.batcher.memory_fraction == 0.8
    torch.manual_seed(1)
    ref_model = nn.Sequential(nn.Linear(784, 10))
    ref = reference_run_seeded(ref_model, dataset, 64, 10, clip=1.0)
    assert max_rel(list(model.parameters()), ref) < 1e-12


# ------------------------------------------------------------------ configuration snippets, as written
class ConvNet(nn.Module):
    """Has the layer names the seed's LAYER_WISE snippet uses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 28 * 28 // 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.view(-1, 1, 28, 28)
        x = torch.relu(self.conv1(x))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Layers(nn.Module):
    """Has the layer names the seed's SELECTIVE snippet uses."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1, self.layer2, self.layer3 = nn.Linear(784, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.layer3(torch.relu(self.layer2(torch.relu(self.layer1(x)))))


def snippet_configs():
    S, M = AccumulationStrategy, AccumulationMode
    return {
        "standard": lambda: GradientAccumulationConfig(mode=M.STANDARD, accumulation_steps=4, effective_batch_size=16, target_batch_size=64),
        "efficient": lambda: GradientAccumulationConfig(mode=M.EFFICIENT, accumulation_steps=8, memory_threshold=0.8, memory_monitoring=True),
        "adaptive": lambda: GradientAccumulationConfig(mode=M.ADAPTIVE, adaptive_scaling=True, memory_threshold=0.7, progressive_scaling=True),
        "progressive": lambda: GradientAccumulationConfig(mode=M.PROGRESSIVE, progressive_scaling=True, accumulation_schedule=[2, 4, 8, 16], gradient_scaling=True),
        "selective": lambda: GradientAccumulationConfig(mode=M.SELECTIVE, selective_accumulation=True, layer_accumulation_weights={'layer1.weight': 1.0, 'layer2.weight': 0.5, 'layer3.weight': 0.25}),
        "uniform": lambda: GradientAccumulationConfig(strategy=S.UNIFORM, accumulation_steps=4),
        "layer_wise": lambda: GradientAccumulationConfig(strategy=S.LAYER_WISE, layer_accumulation_weights={'conv1.weight': 1.0, 'conv2.weight': 0.8, 'fc1.weight': 0.6, 'fc2.weight': 0.4}),
        "parameter_groups": lambda: GradientAccumulationConfig(strategy=S.PARAMETER_GROUPS, parameter_group_weights={'group_0': 1.0, 'group_1': 0.5, 'group_2': 0.25}),
        "adaptive_layers": lambda: GradientAccumulationConfig(strategy=S.ADAPTIVE_LAYERS, adaptive_scaling=True, gradient_clipping=True, clipping_norm=1.0),
        "memory_aware": lambda: GradientAccumulationConfig(strategy=S.MEMORY_AWARE, memory_threshold=0.8, memory_monitoring=True, adaptive_scaling=True),
        "basic_configuration": lambda: GradientAccumulationConfig(accumulation_steps=4, effective_batch_size=16, target_batch_size=64, gradient_scaling=True, loss_scaling=True),
        "advanced_configuration": lambda: GradientAccumulationConfig(
            accumulation_steps=8, mode=M.ADAPTIVE, strategy=S.MEMORY_AWARE, effective_batch_size=32, target_batch_size=256,
            memory_threshold=0.8, memory_monitoring=True, adaptive_scaling=True, progressive_scaling=True,
            gradient_clipping=True, clipping_norm=1.0, nan_handling=True,
            layer_accumulation_weights={'conv1.weight': 1.0, 'conv2.weight': 0.8, 'fc1.weight': 0.6, 'fc2.weight': 0.4}),
    }


EXPECTED_WARNINGS = {"adaptive": "memory_threshold", "advanced_configuration": "layer_accumulation_weights"}
# What the library says about these snippets once it sees the optimizer and the data: constant per-parameter
# weights barely change an Adam update; 16-sample micro-batches are not the effective_batch_size=32 configured.
SETUP_WARNINGS = {name: r"accumulation weights \[.*\] with Adam" for name in ("selective", "layer_wise",
                                                                               "parameter_groups")}
TRAIN_WARNINGS = {"advanced_configuration": "micro-batches hold 16 samples but effective_batch_size=32"}


def _warns(match: str | None):
    return pytest.warns(UserWarning, match=match) if match else contextlib.nullcontext()


@pytest.mark.parametrize("name", list(snippet_configs()))
def test_configuration_snippet_runs_and_trains(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = snippet_configs()[name]()
    msgs = [str(w.message) for w in caught]
    if name in EXPECTED_WARNINGS:
        assert any(EXPECTED_WARNINGS[name] in m for m in msgs), msgs
    else:
        assert not msgs, msgs
    torch.manual_seed(0)
    model = ConvNet() if name == "layer_wise" else Layers() if name == "selective" else nn.Sequential(
        nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    if name == "parameter_groups":
        layers = list(model)
        optimizer = torch.optim.Adam([{"params": [layers[0].weight]}, {"params": [layers[0].bias]},
                                      {"params": list(layers[2].parameters())}], lr=3e-3)  # three groups
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    trainer = GradientAccumulationTrainer(config)
    with _warns(SETUP_WARNINGS.get(name)):
        trainer.setup_training(model, optimizer, nn.CrossEntropyLoss())
    loader = data.DataLoader(make_dataset(n=128), batch_size=16, shuffle=True)
    with _warns(TRAIN_WARNINGS.get(name)):
        trainer.train(loader, num_epochs=4)
    assert losses(trainer)[-1] < losses(trainer)[0]


# ------------------------------------------------------------------ modes and strategies: effects
def _sgd_run(config, model, batches, *, lr=0.1, groups=None, weights=None):
    opt = torch.optim.SGD(groups if groups is not None else model.parameters(), lr=lr)
    acc = GradientAccumulator(config, model=model, optimizer=opt)
    for i, (x, y) in enumerate(batches):
        acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=None if weights is None else weights[i])
        acc.zero_grad()
    acc.flush()
    return acc


def _batches(k=4, n=8, features=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(k)]


def _large_grad(model, batches):
    model.zero_grad()
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
    nn.functional.cross_entropy(model(x), y).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT, AccumulationMode.SELECTIVE])
def test_fixed_k_modes_equal_one_large_sgd_step(mode):
    model, batches = _mlp(), _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, batches)
    acc = _sgd_run(GradientAccumulationConfig(mode=mode, accumulation_steps=4), model, batches)
    assert acc.state.total_optimizer_steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g[n], rtol=1e-12, atol=1e-14)
    buffers = acc.optimizer.stats()["buffer_bytes"]
    assert (buffers == 0) == (mode is AccumulationMode.EFFICIENT)  # EFFICIENT: no extra memory


def test_uneven_weights_match_the_sample_mean():
    model, batches = _mlp(), _batches()
    batches = [(x[: 2 + i], y[: 2 + i]) for i, (x, y) in enumerate(batches)]  # 2, 3, 4, 5 samples
    before = [p.detach().clone() for p in model.parameters()]
    g = _large_grad(model, batches)
    _sgd_run(GradientAccumulationConfig(accumulation_steps=4), model, batches, weights=[2, 3, 4, 5])
    for p, b, gg in zip(model.parameters(), before, g.values()):
        torch.testing.assert_close(p.detach(), b - 0.1 * gg, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("route", ["accumulator", "wrapper"])
@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_backward_false_takes_a_backward_run_through_the_wrapper(mode, route):
    model, batches = _mlp(), _batches()
    batches = [(x[: 2 + i], y[: 2 + i]) for i, (x, y) in enumerate(batches)]  # 2, 3, 4, 5 samples
    before = [p.detach().clone() for p in model.parameters()]
    g = _large_grad(model, batches)
    acc = GradientAccumulator(GradientAccumulationConfig(mode=mode, accumulation_steps=4), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        (acc.backward if route == "accumulator" else acc.optimizer.backward)(loss, weight=len(x))
        out = acc.accumulate_gradients(loss, backward=False, num_samples=len(x))
        acc.zero_grad()
    assert out["should_optimize"] and out["effective_batch_size"] == 14
    for p, b, gg in zip(model.parameters(), before, g.values()):
        torch.testing.assert_close(p.detach(), b - 0.1 * gg, rtol=1e-12, atol=1e-14)


def test_layer_wise_and_selective_weights_multiply_the_gradient():
    for cfg in (GradientAccumulationConfig(strategy=AccumulationStrategy.LAYER_WISE, accumulation_steps=4,
                                           layer_accumulation_weights={"0.weight": 0.5, "2.*": 0.25}),
                GradientAccumulationConfig(mode=AccumulationMode.SELECTIVE, accumulation_steps=4,
                                           layer_accumulation_weights={"0.weight": 0.5, "2.*": 0.25},
                                           exclude_parameters=["0.bias"])):
        model, batches = _mlp(), _batches()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = _large_grad(model, batches)
        _sgd_run(cfg, model, batches)
        w = {"0.weight": 0.5, "0.bias": 1.0, "2.weight": 0.25, "2.bias": 0.25}
        if cfg.exclude_parameters:
            w["0.bias"] = 0.0
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.1 * w[n] * g[n], rtol=1e-12, atol=1e-14)


def test_layer_weights_matching_nothing_raise_when_used():
    model = _mlp()
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.LAYER_WISE, layer_accumulation_weights={"fc1.weight": 0.5})
    with pytest.raises(ValueError, match="match no parameter name"):
        GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_parameter_group_weights_multiply_each_group():
    model, batches = _mlp(), _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, batches)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.PARAMETER_GROUPS, accumulation_steps=4,
                                     parameter_group_weights={"group_0": 1.0, "group_1": 0.5})
    _sgd_run(cfg, model, batches, groups=groups)
    for n, p in model.named_parameters():
        w = 1.0 if n.startswith("0.") else 0.5
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * w * g[n], rtol=1e-12, atol=1e-14)


def test_adaptive_layers_is_unitwise_adaptive_clipping():
    model, batches = _mlp(), _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, batches)
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.ADAPTIVE_LAYERS, accumulation_steps=4,
                                     agc_clip_factor=0.01)
    _sgd_run(cfg, model, batches)
    clipped_any = False
    for n, p in model.named_parameters():  # float64 AGC reference (Brock et al. 2021), per output unit
        w, gr = before[n], g[n]
        dims = tuple(range(1, w.ndim))
        wn = (w.norm(dim=dims, keepdim=True) if w.ndim > 1 else w.norm()).clamp_min(1e-3)
        gn = gr.norm(dim=dims, keepdim=True) if w.ndim > 1 else gr.norm()
        ref = torch.where(gn > 0.01 * wn, gr * (0.01 * wn / gn.clamp_min(1e-6)), gr)
        clipped_any |= bool((gn > 0.01 * wn).any())
        torch.testing.assert_close(p.detach(), w - 0.1 * ref, rtol=1e-12, atol=1e-14)
    assert clipped_any


class OOMAbove(nn.Module):
    """Raises torch.OutOfMemoryError for micro-batches above a size, in forward or mid-backward."""

    def __init__(self, limit: int, where: str) -> None:
        super().__init__()
        self.net, self.limit, self.where, self.raised = _mlp(), limit, where, 0

    def forward(self, x):
        if x.shape[0] > self.limit and self.where == "forward":
            self.raised += 1
            raise torch.OutOfMemoryError("injected")
        h = self.net[0](x)
        if x.shape[0] > self.limit and self.where == "backward":
            def boom(grad):
                self.raised += 1
                raise torch.OutOfMemoryError("injected")
            h.register_hook(boom)  # net[2] already has its gradient when this fires
        return self.net[2](self.net[1](h))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_memory_aware_splits_on_oom_and_stays_exact(where):
    model, batches = OOMAbove(3, where), _batches(k=4, n=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model.net, batches)
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=4, device="cpu")
    trainer = GradientAccumulationTrainer(cfg)
    trainer.setup_training(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss())
    results = [trainer.train_step(x, y) for x, y in batches]
    assert [r["should_optimize"] for r in results] == [False, False, False, True]
    mb = trainer.accumulator.batcher
    assert model.raised >= 1 and mb.ooms == 2 and mb.micro_batch_size == 2  # 8 -> 4 -> 2 samples
    assert sum(mb.last.sizes) == 32 and set(mb.last.sizes) == {2}  # every sample exactly once
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g[n[4:]], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_memory_aware_trainer_recovers_from_oom_exactly_like_the_large_batch(f64, where, mode):
    # Adam, 3 epochs, 100 samples in loader batches of 16, K=4: windows of 64 and 36 samples, each
    # forwarded in micro-batches of at most 5 after the injected out-of-memory errors.
    dataset = make_dataset(n=100, features=6, classes=3)
    torch.manual_seed(1)
    model = OOMAbove(5, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EFFICIENT + MEMORY_AWARE: the buffered fallback warns
        cfg = GradientAccumulationConfig(mode=mode, strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=4,
                                         device="cpu", progress_bar=False)
    trainer = GradientAccumulationTrainer(cfg)
    trainer.setup_training(model, torch.optim.Adam(model.parameters(), lr=0.01), nn.CrossEntropyLoss())
    torch.manual_seed(2)
    trainer.train(data.DataLoader(dataset, batch_size=16, shuffle=True), num_epochs=3)
    assert model.raised >= 2 and trainer.accumulator.batcher.ooms >= 2
    assert [h["optimization_steps"] for h in trainer.training_history] == [2, 2, 2]
    ref = _mlp()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    torch.manual_seed(2)
    for _ in range(3):
        for x, y in data.DataLoader(dataset, batch_size=64, shuffle=True):  # same permutation: 64 + 36
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
    assert max_rel(list(model.net.parameters()), list(ref.parameters())) < 1e-12


@pytest.mark.parametrize("adaptive_scaling,grow_after", [(None, 50), (True, 50), (False, 0)])
def test_memory_aware_adaptive_scaling_lets_the_micro_batch_grow_back(adaptive_scaling, grow_after):
    model, batches = _mlp(), _batches(k=2)
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=2,
                                     adaptive_scaling=adaptive_scaling)
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    for b in batches:
        acc.accumulate_batch(b, lambda micro: nn.functional.cross_entropy(model(micro[0]), micro[1]))
    assert acc.batcher.grow_after == grow_after and acc.state.total_optimizer_steps == 1


def test_memory_aware_accumulator_batches_recover_from_oom_exactly():
    model, batches = OOMAbove(3, "backward"), _batches(k=3, n=8)
    batches = batches + [(batches[0][0][:5], batches[0][1][:5])]  # a short batch: 8, 8, 8, 5 samples
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g1 = _large_grad(model.net, batches[:2])
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=2)
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])  # noqa: E731
    out = [acc.accumulate_batch(b, fn) for b in batches[:2]]
    assert out[0]["loss"] is None and out[1]["should_optimize"] and out[1]["window_samples"] == 16
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g1[n[4:]], rtol=1e-12, atol=1e-14)
    after1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g2 = _large_grad(model.net, batches[2:])  # the partial window: 8 + 5 samples, sample-weighted
    for b in batches[2:]:
        acc.accumulate_batch(b, fn)
    assert acc.state.accumulation_step == 0 and acc.state.total_optimizer_steps == 2
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), after1[n] - 0.1 * g2[n[4:]], rtol=1e-12, atol=1e-14)
    acc.accumulate_batch(batches[0], fn)
    assert acc.state.accumulation_step == 1 and acc.flush() and acc.state.total_optimizer_steps == 3
    with pytest.raises(RuntimeError, match="MEMORY_AWARE"):
        GradientAccumulator(GradientAccumulationConfig(), model=_mlp(),
                            optimizer=torch.optim.SGD(_mlp().parameters(), lr=0.1)).accumulate_batch(batches[0], fn)


def test_memory_aware_window_concatenates_per_sample_strings():
    model, batches = _mlp(), _batches(k=2, n=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, batches)
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.MEMORY_AWARE, accumulation_steps=2)
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))

    def fn(b):
        assert len(b["text"]) == len(b["x"])  # the strings travel with their rows
        return nn.functional.cross_entropy(model(b["x"]), b["y"])

    for i, (x, y) in enumerate(batches):
        acc.accumulate_batch({"x": x, "y": y, "text": [f"b{i}s{j}" for j in range(len(x))]}, fn)
    assert acc.state.total_optimizer_steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g[n], rtol=1e-12, atol=1e-14)


def test_progressive_k_by_epoch_and_lr_rule():
    model, batches = _mlp(), _batches(k=8)
    cfg = GradientAccumulationConfig(mode=AccumulationMode.PROGRESSIVE, accumulation_schedule=[2, 4],
                                     progressive_scaling=True, lr_scaling_rule="linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen_lr = []
    opt.register_step_pre_hook(lambda o, a, k: seen_lr.append(o.param_groups[0]["lr"]))
    acc = GradientAccumulator(cfg, model=model, optimizer=opt)
    ks = []
    for epoch in range(2):
        acc.set_epoch(epoch)
        for x, y in batches:
            r = acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y))
            acc.zero_grad()
            if r["should_optimize"]:
                ks.append(r["accumulation_steps"])
    assert ks == [2, 2, 2, 2, 4, 4]
    # Each update used the LR times the linear rule's K / K0 (the wrapper's lr_scaling).
    assert seen_lr == [0.1] * 4 + [0.1 * 2] * 2


def test_adaptive_mode_is_adaptive_k_over_the_wrappers_noise_scale():
    cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, accumulation_steps=4, min_accumulation_steps=2,
                                     max_accumulation_steps=16)
    model = _mlp()
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(acc.adaptive, AdaptiveK) and (acc.adaptive.k_min, acc.adaptive.k_max, acc.adaptive.k) == (2, 16, 4)
    assert acc.optimizer.accumulation_steps == 4 and acc.optimizer.noise_scale() is None  # on, no window yet


class _RegressionNoise:
    """Linear regression with Gaussian label noise: B_simple = (d + 1) + d s^2 / |w - w*|^2 (closed form)."""

    def __init__(self, d: int = 4, sigma: float = 1.0, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.d, self.sigma = d, sigma
        self.w_star = torch.randn(d, generator=self.g, dtype=torch.float64)
        delta = torch.randn(d, generator=self.g, dtype=torch.float64)
        self.w0 = self.w_star + delta / delta.norm()  # |w - w*| = 1
        self.closed_form = (d + 1) + d * sigma ** 2

    def sample(self, b: int):
        x = torch.randn(b, self.d, generator=self.g, dtype=torch.float64)
        return x, x @ self.w_star + self.sigma * torch.randn(b, generator=self.g, dtype=torch.float64)


@pytest.mark.parametrize("k0", [2, 32])
def test_adaptive_mode_moves_k_toward_the_noise_scale(k0):
    prob, b = _RegressionNoise(), 2  # B_simple = 9 samples: 4.5 micro-batches of 2
    model = nn.Linear(prob.d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(prob.w0)
    cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, accumulation_steps=k0, effective_batch_size=b,
                                     min_accumulation_steps=1, max_accumulation_steps=64)
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # lr 0: B fixed
    ks = []
    for _ in range(20000):
        x, y = prob.sample(b)
        r = acc.accumulate_gradients((0.5 * (model(x).squeeze(-1) - y) ** 2).mean(), weight=b)
        acc.zero_grad()
        if r["should_optimize"]:
            ks.append(r["accumulation_steps"])
        if len(ks) >= 60:
            break
    target = prob.closed_form / b
    assert abs(acc.optimizer.noise_scale().item() / prob.closed_form - 1) < 0.35
    assert ks[0] == k0 and ks[-1] in (4, 8) and 4 <= target <= 8  # a power of two next to the target
    assert all(1 <= k <= 64 for k in ks)
    assert all(abs(math.log(c / target)) <= abs(math.log(a / target)) for a, c in zip(ks, ks[1:]) if a != c)
    assert len(set(ks[-20:])) == 1  # settled: no oscillation


# ------------------------------------------------------------------ fields: effects
def test_batch_sizes_agree_or_are_derived():
    c = GradientAccumulationConfig(effective_batch_size=16, target_batch_size=64)
    assert c.accumulation_steps == 4
    c = GradientAccumulationConfig(accumulation_steps=4, target_batch_size=64)
    assert c.effective_batch_size == 16
    c = GradientAccumulationConfig(accumulation_steps=4, effective_batch_size=16)
    assert c.target_batch_size == 64
    assert GradientAccumulationConfig().accumulation_steps == 1


def test_loss_scaling_false_sums_the_window():
    for k, n_batches in ((4, 4), (4, 3)):  # full window, and a flushed partial window
        model, batches = _mlp(), _batches(k=n_batches)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        gsum = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for b in batches:
            for n, gg in _large_grad(model, [b]).items():
                gsum[n] += gg
        _sgd_run(GradientAccumulationConfig(accumulation_steps=k, loss_scaling=False), model, batches)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n] - 0.1 * gsum[n], rtol=1e-12, atol=1e-14)


def test_gradient_scaling_creates_a_scaler_for_float16_only():
    model = _mlp().float()
    for mp, gs, expected in (("float16", True, True), ("float16", False, False), ("bfloat16", True, False),
                             (None, True, False)):
        acc = GradientAccumulator(GradientAccumulationConfig(mixed_precision=mp, gradient_scaling=gs),
                                  model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        assert (acc.scaler is not None) == expected


def test_gradient_clipping_equals_clip_grad_norm_on_the_large_batch():
    model, batches = _mlp(), _batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, batches)
    total = torch.sqrt(sum((gg ** 2).sum() for gg in g.values()))
    assert total > 0.05
    _sgd_run(GradientAccumulationConfig(accumulation_steps=4, gradient_clipping=True, clipping_norm=0.05), model, batches)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g[n] * (0.05 / (total + 1e-6)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nan_handling", [True, False])
def test_nan_handling_skips_a_poisoned_window(nan_handling):
    model, batches = _mlp(), _batches()
    batches[1] = (batches[1][0].clone().fill_(float("nan")), batches[1][1])
    before = [p.detach().clone() for p in model.parameters()]
    acc = _sgd_run(GradientAccumulationConfig(accumulation_steps=4, nan_handling=nan_handling), model, batches)
    stats = acc.get_accumulation_stats()
    if nan_handling:
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert stats["skipped_updates"] == 1 and stats["nan_detected"]
    else:
        assert all(torch.isnan(p).any() for p in model.parameters())


def test_nan_policy_drop_keeps_the_good_micro_batches():
    model, batches = _mlp(), _batches()
    good = [b for i, b in enumerate(batches) if i != 2]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _large_grad(model, good)
    batches[2] = (batches[2][0].clone().fill_(float("nan")), batches[2][1])
    _sgd_run(GradientAccumulationConfig(accumulation_steps=4, nan_handling=True, nan_policy="drop"), model, batches)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g[n], rtol=1e-12, atol=1e-14)


def test_memory_monitoring_records_and_warns_over_threshold(caplog):
    model, batches = _mlp(), _batches()
    cfg = GradientAccumulationConfig(accumulation_steps=2, memory_monitoring=True, memory_threshold=1e-9)
    with caplog.at_level(logging.WARNING, logger="accumopt"):
        acc = _sgd_run(cfg, model, batches)
    assert len(acc.state.memory_usage) == 2 and all(0 < m < 1 for m in acc.state.memory_usage)
    assert sum("above memory_threshold" in r.message for r in caplog.records) == 1  # on crossing, not every update
    acc = _sgd_run(GradientAccumulationConfig(accumulation_steps=2), _mlp(), batches)
    assert acc.state.memory_usage == ()


def test_logging_frequency_logs_every_n_updates(caplog):
    with caplog.at_level(logging.INFO, logger="accumopt"):
        _sgd_run(GradientAccumulationConfig(accumulation_steps=1, logging_frequency=2), _mlp(), _batches(k=8))
    assert sum(r.message.startswith("accumopt: update ") for r in caplog.records) == 4


def test_accumulate_gradients_returns_seed_keys_and_state_is_read_only():
    model, batches = _mlp(), _batches()
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=3, effective_batch_size=8),
                              model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    out = [acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y)) for x, y in batches]
    assert [o["accumulation_step"] for o in out] == [1, 2, 3, 1]
    assert [o["should_optimize"] for o in out] == [False, False, True, False]
    assert all(isinstance(o["loss"], torch.Tensor) and o["loss"].ndim == 0 for o in out)
    assert out[0]["effective_batch_size"] == 24
    st = acc.state
    assert isinstance(st, AccumulationState) and st.total_steps == 4 and st.total_optimizer_steps == 1
    assert st.last_optimizer_step == 3 and st.accumulation_step == 1
    assert st.accumulated_loss == out[3]["loss"].item()  # the open window's mean loss (one micro-batch)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.total_steps = 0  # frozen
    acc.optimizer.discard()  # the open window stays unapplied on purpose


def test_save_and_load_accumulation_state_mid_window(tmp_path):
    def build():
        model = _mlp()
        return model, GradientAccumulator(GradientAccumulationConfig(accumulation_steps=4), model=model,
                                          optimizer=torch.optim.Adam(model.parameters(), lr=0.01))

    batches = _batches(k=10)
    m1, a1 = build()
    for x, y in batches:
        a1.accumulate_gradients(nn.functional.cross_entropy(m1(x), y)); a1.zero_grad()
    m2, a2 = build()
    for x, y in batches[:6]:
        a2.accumulate_gradients(nn.functional.cross_entropy(m2(x), y)); a2.zero_grad()
    a2.save_accumulation_state(tmp_path / "acc.pt")
    params = {k: v.clone() for k, v in m2.state_dict().items()}
    assert torch.load(tmp_path / "acc.pt", weights_only=True)["extra"]["accumulator"]["config"]["accumulation_steps"] == 4
    m3, a3 = build()
    m3.load_state_dict(params)
    a3.load_accumulation_state(tmp_path / "acc.pt")
    assert a3.state.accumulation_step == 2
    for x, y in batches[6:]:
        a3.accumulate_gradients(nn.functional.cross_entropy(m3(x), y)); a3.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    m4 = _mlp()
    other = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=8), model=m4,
                                optimizer=torch.optim.Adam(m4.parameters(), lr=0.01))
    with pytest.raises(ValueError, match="different configuration"):
        other.load_accumulation_state(tmp_path / "acc.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Invalid checkpoint file"):
        a3.load_accumulation_state(tmp_path / "bad.pt")
    a1.optimizer.discard()  # 10 micro-batches, K=4: the last window stays open on purpose
    a3.optimizer.discard()


def test_every_enum_member_has_a_meaning():
    assert {m.name for m in AccumulationMode} == {"STANDARD", "EFFICIENT", "ADAPTIVE", "PROGRESSIVE", "SELECTIVE"}
    assert {s.name for s in AccumulationStrategy} == {"UNIFORM", "LAYER_WISE", "PARAMETER_GROUPS",
                                                      "ADAPTIVE_LAYERS", "MEMORY_AWARE"}
    assert GradientAccumulationConfig(mode="efficient").mode is AccumulationMode.EFFICIENT
    assert GradientAccumulationConfig(mode=AccumulationMode.EFFICIENT).storage == "inplace"
    assert GradientAccumulationConfig().storage == "buffered"


# ------------------------------------------------------------------ contradictions and bad values
M, S = AccumulationMode, AccumulationStrategy
BAD = [
    (dict(accumulation_steps=4, effective_batch_size=16, target_batch_size=32), ValueError, r"target_batch_size: 32 \(expected .* 16 x 4 = 64\)"),
    (dict(effective_batch_size=16, target_batch_size=40), ValueError, "multiple of effective_batch_size=16"),
    (dict(accumulation_steps=3, target_batch_size=64), ValueError, "multiple of accumulation_steps=3"),
    (dict(accumulation_steps=0), ValueError, r"accumulation_steps: 0 \(expected an int >= 1\)"),
    (dict(accumulation_steps=2.0), TypeError, "accumulation_steps"),
    (dict(mode="fast"), ValueError, "Invalid mode: 'fast'"),
    (dict(mode=3), TypeError, "Invalid mode"),
    (dict(strategy="layers"), ValueError, "Invalid strategy"),
    (dict(mode=M.PROGRESSIVE), ValueError, "accumulation_schedule: None with mode=PROGRESSIVE"),
    (dict(accumulation_schedule=[2, 4]), ValueError, "needs mode=AccumulationMode.PROGRESSIVE"),
    (dict(mode=M.PROGRESSIVE, accumulation_schedule=[2, 0]), ValueError, r"accumulation_schedule\[1\]"),
    (dict(mode=M.PROGRESSIVE, accumulation_schedule=[]), ValueError, "non-empty"),
    (dict(mode=M.PROGRESSIVE, accumulation_schedule=[2, 4], accumulation_steps=4), ValueError, "schedule's first K"),
    (dict(mode=M.PROGRESSIVE, accumulation_schedule=[2, 4], target_batch_size=64), ValueError, "target_batch_size: 64 with mode=PROGRESSIVE"),
    (dict(mode=M.SELECTIVE, selective_accumulation=False), ValueError, "selective_accumulation: False with mode=SELECTIVE"),
    (dict(exclude_parameters=["fc.weight"]), ValueError, "exclude_parameters: set while selective_accumulation is False"),
    (dict(strategy=S.LAYER_WISE, layer_accumulation_weights={"a": 0.0}), ValueError, "0.0 freezes the parameter"),
    (dict(strategy=S.LAYER_WISE, layer_accumulation_weights={"a": -1.0}), ValueError, "expected a number >= 0"),
    (dict(strategy=S.LAYER_WISE, layer_accumulation_weights={"a": float("nan")}), ValueError, "finite"),
    (dict(strategy=S.LAYER_WISE), ValueError, "empty with strategy=LAYER_WISE"),
    (dict(strategy=S.PARAMETER_GROUPS), ValueError, "None with strategy=PARAMETER_GROUPS"),
    (dict(strategy=S.LAYER_WISE, layer_accumulation_weights=[1.0]), TypeError, "layer_accumulation_weights"),
    (dict(memory_threshold=1.5, memory_monitoring=True), ValueError, r"memory_threshold: 1.5 \(expected a fraction"),
    (dict(memory_threshold=0.0, memory_monitoring=True), ValueError, "memory_threshold"),
    (dict(clipping_norm=1.0), ValueError, "clipping_norm: 1.0 with gradient_clipping=False"),
    (dict(gradient_clipping=True, clipping_norm=-1.0), ValueError, "clipping_norm"),
    (dict(agc_clip_factor=0.0), ValueError, "agc_clip_factor"),
    (dict(nan_policy="skip"), ValueError, "nan_policy: 'skip' with nan_handling=False"),
    (dict(nan_handling=True, nan_policy="zero"), ValueError, "Invalid nan_policy"),
    (dict(mode=M.EFFICIENT, nan_handling=True, nan_policy="drop"), ValueError, "'drop' with mode=EFFICIENT"),
    (dict(mode=M.ADAPTIVE, adaptive_scaling=False), ValueError, "adaptive_scaling: False with mode=ADAPTIVE"),
    (dict(strategy=S.ADAPTIVE_LAYERS, adaptive_scaling=False), ValueError, "False with strategy=ADAPTIVE_LAYERS"),
    (dict(min_accumulation_steps=2), ValueError, "min_accumulation_steps: 2 with mode=STANDARD .*bounds K in mode=ADAPTIVE only"),
    (dict(mode=M.ADAPTIVE, accumulation_steps=8, max_accumulation_steps=4), ValueError, "within min_accumulation_steps"),
    (dict(logging_frequency=0), ValueError, "logging_frequency"),
    (dict(gradient_scaling="yes"), TypeError, "gradient_scaling"),
    (dict(mixed_precision="float8"), ValueError, "mixed_precision"),
    (dict(lr_scaling_rule="cubic"), ValueError, "lr_scaling_rule"),
    (dict(checkpoint_every=10), ValueError, "checkpoint_every: set without checkpoint_path"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_contradictions_and_bad_values_raise(kwargs, exc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match):
            GradientAccumulationConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(adaptive_scaling=True), "adaptive_scaling=True has no effect"),
    (dict(progressive_scaling=True), "progressive_scaling=True has no effect"),
    (dict(memory_threshold=0.5), "memory_threshold=0.5 has no effect"),
    (dict(parameter_group_weights=[1.0]), "parameter_group_weights has no effect"),
    (dict(layer_accumulation_weights={"x": 1.0}), "layer_accumulation_weights has no effect"),
])
def test_unused_settings_warn(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        GradientAccumulationConfig(**kwargs)


def test_config_round_trips_as_plain_data():
    c = snippet_configs()["progressive"]()
    d = c.to_dict()
    assert all(isinstance(v, (int, float, str, bool, list, dict, type(None))) for v in d.values())
    assert GradientAccumulationConfig.from_dict(d) == c
    assert c.memory_threshold is None  # read by neither memory_monitoring nor MEMORY_AWARE here
    assert math.isclose(GradientAccumulationConfig(memory_monitoring=True).memory_threshold, 0.9)


# ----------------------------------------------------------------------------------- regressions
def _sgd_step_reference(model, batches, lr=0.1):
    """Parameters after one plain SGD step on the concatenated batches, computed on a copy from fresh gradients."""
    import copy

    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
    nn.functional.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        return {n: p - lr * p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_setup_clears_stale_gradients_like_the_seeds_zero_grad(mode):
    model, batches = _mlp(), _batches()
    expected = _sgd_step_reference(model, batches)
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches])
    nn.functional.cross_entropy(model(x), y).backward()  # a stale full-batch gradient, as in the reference script
    assert all(p.grad is not None for p in model.parameters())
    acc = GradientAccumulator(GradientAccumulationConfig(mode=mode, accumulation_steps=4), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(p.grad is None for p in model.parameters())
    for bx, by in batches:
        acc.accumulate_gradients(nn.functional.cross_entropy(model(bx), by))
        acc.zero_grad()
    assert acc.state.total_optimizer_steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-12, atol=1e-14)


def test_effective_batch_size_counts_the_samples_of_each_update():
    model, batches = _mlp(), _batches(k=5)
    sizes = [2, 3, 4, 5, 6]
    batches = [(x[:s], y[:s]) for (x, y), s in zip(batches, sizes)]
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=2), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    closed = []
    for x, y in batches:
        r = acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=len(x))
        acc.zero_grad()
        if r["should_optimize"]:
            closed.append(r["effective_batch_size"])
    assert closed == [2 + 3, 4 + 5]
    assert acc.flush() and acc.state.effective_batch_size == 6  # the flushed partial window: what it held
    assert acc.get_accumulation_stats()["effective_batch_size"] == 6
    # loss_scaling=False ignores the weight, but num_samples still counts the samples.
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=2, loss_scaling=False), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    outs = [acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), num_samples=len(x))
            for x, y in batches[:2]]
    assert outs[-1]["should_optimize"] and outs[-1]["effective_batch_size"] == 5
    # Nothing known: None, never a made-up number.
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=2), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    out = acc.accumulate_gradients(nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]))
    assert out["effective_batch_size"] is None
    with pytest.raises(ValueError, match="num_samples: -1"):
        acc.accumulate_gradients(nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]), num_samples=-1)
    acc.optimizer.discard()  # the open window stays unapplied on purpose


def test_micro_batch_size_other_than_effective_batch_size_warns_once():
    model, batches = _mlp(), _batches(k=8, n=8)
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=2, effective_batch_size=4), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in batches:
            out = acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=len(x))
            acc.zero_grad()
    msgs = [str(w.message) for w in caught if "effective_batch_size=4" in str(w.message)]
    assert len(msgs) == 1 and "8 samples" in msgs[0] and "2 x 8 = 16" in msgs[0]
    assert out["effective_batch_size"] == 16  # the real batch, not the configured 2 x 4
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=2, effective_batch_size=8), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches[:4]:
            acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=len(x))


def test_adaptive_target_batch_size_is_the_largest_batch_per_update():
    cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, effective_batch_size=32, target_batch_size=256)
    assert (cfg.accumulation_steps, cfg.max_accumulation_steps, cfg.min_accumulation_steps) == (8, 8, 1)
    cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, accumulation_steps=2, effective_batch_size=32,
                                     target_batch_size=256, max_accumulation_steps=8)
    assert cfg.accumulation_steps == 2 and cfg.max_accumulation_steps == 8
    assert GradientAccumulationConfig.from_dict(cfg.to_dict()) == cfg
    # Without a target it is derived from the upper bound (so that a round trip keeps the bound).
    cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, accumulation_steps=4, effective_batch_size=2,
                                     max_accumulation_steps=16)
    assert cfg.target_batch_size == 32 and GradientAccumulationConfig.from_dict(cfg.to_dict()) == cfg

    def ks(**kw):  # samples of each update, on a problem with a large noise scale (521 samples)
        prob, b = _RegressionNoise(d=8, sigma=8.0), 2
        model = nn.Linear(prob.d, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(prob.w0)
        cfg = GradientAccumulationConfig(mode=AccumulationMode.ADAPTIVE, accumulation_steps=2, effective_batch_size=b,
                                         min_accumulation_steps=2, **kw)
        acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
        out = []
        while len(out) < 30:
            x, y = prob.sample(b)
            r = acc.accumulate_gradients((0.5 * (model(x).squeeze(-1) - y) ** 2).mean(), weight=b)
            acc.zero_grad()
            if r["should_optimize"]:
                out.append(r["effective_batch_size"])
        return out

    capped = ks(target_batch_size=16)
    assert max(capped) == 16 and capped[-1] == 16  # it grows to the target and never beyond
    assert max(ks(max_accumulation_steps=64)) > 16  # without the target the same run goes further


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode=M.ADAPTIVE, effective_batch_size=32, target_batch_size=256, max_accumulation_steps=4),
     r"max_accumulation_steps: 4 with target_batch_size=256 .* expected 8"),
    (dict(mode=M.ADAPTIVE, accumulation_steps=16, effective_batch_size=32, target_batch_size=256),
     r"accumulation_steps: 16 with target_batch_size=256 .* <= 256 / 32 = 8"),
    (dict(mode=M.ADAPTIVE, accumulation_steps=2, target_batch_size=256), "needs|give effective_batch_size"),
    (dict(mode=M.ADAPTIVE, effective_batch_size=32, target_batch_size=100), "multiple of effective_batch_size=32"),
    (dict(mode=M.ADAPTIVE, min_accumulation_steps=8, max_accumulation_steps=4),
     r"min_accumulation_steps: 8 > max_accumulation_steps=4"),
    (dict(device="tpu"), r"Invalid device: 'tpu' \(expected a torch device string"),
])
def test_contradictions_raise_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientAccumulationConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(selective_accumulation=True), "selective_accumulation=True has no effect"),
    (dict(lr_scaling_rule="linear"), "lr_scaling_rule='linear' has no effect"),
    (dict(mode=M.PROGRESSIVE, accumulation_schedule=[2, 4], lr_scaling_rule="linear"), "lr_scaling_rule"),
    (dict(agc_clip_factor=0.05), "agc_clip_factor=0.05 has no effect"),
    (dict(checkpoint_path="run.pt"), "checkpoint_path='run.pt' has no effect"),
])
def test_settings_without_effect_warn(kwargs, match):
    with pytest.warns(UserWarning, match=match):
        GradientAccumulationConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(memory_monitoring=True, memory_threshold=0.5),
    dict(strategy=S.MEMORY_AWARE),
    dict(mode=M.SELECTIVE, selective_accumulation=True),
    dict(strategy=S.LAYER_WISE, selective_accumulation=True, layer_accumulation_weights={"0.weight": 0.0}),
    dict(selective_accumulation=True, exclude_parameters=["0.bias"]),
    dict(mode=M.PROGRESSIVE, accumulation_schedule=[2, 4], progressive_scaling=True, lr_scaling_rule="linear"),
    dict(strategy=S.ADAPTIVE_LAYERS, agc_clip_factor=0.05),
    dict(checkpoint_every=5, checkpoint_path="run.pt"),
])
def test_settings_with_effect_and_round_trips_do_not_warn(kwargs):
    import dataclasses

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = GradientAccumulationConfig(**kwargs)
        assert dataclasses.replace(cfg) == cfg  # re-validation of the resolved values: still silent
        assert GradientAccumulationConfig(**cfg.to_dict()) == cfg
    assert cfg.agc_clip_factor == (0.05 if "agc_clip_factor" in kwargs else None)
    assert cfg.lr_scaling_rule == ("linear" if "lr_scaling_rule" in kwargs else None)


def test_stats_are_numbers_before_any_reading_as_in_the_reference():
    model, batches = _mlp(), _batches()
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=4), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    stats = acc.get_accumulation_stats()
    assert stats["average_gradient_norm"] == 0.0 and stats["memory_usage"] == 0.0
    # The reference's formatting of these keys works.
    assert f"{stats['average_gradient_norm']:.4f} {stats['memory_usage']:.4f}" == "0.0000 0.0000"
    assert stats["nan_detected"] is False and stats["overflow_detected"] is False


def _window_sums(model, batches, weights):
    """sum_i w_i g_i per parameter name, each g_i from torch.autograd.grad (independent of accumopt)."""
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for (x, y), w in zip(batches, weights):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads):
            out[n] += w * g
    return out


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_state_has_the_reference_fields(mode):
    model, batches = _mlp(), _batches(k=8)
    weights = [3, 5, 2, 7, 4, 6, 1, 8]
    acc = GradientAccumulator(GradientAccumulationConfig(mode=mode, accumulation_steps=4, nan_handling=True),
                              model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    st = acc.state
    assert st.accumulated_gradients == {} and st.average_gradient_norm is None and not st.nan_detected
    norms = []
    for w in range(2):
        window = batches[4 * w: 4 * w + 4]
        ws = weights[4 * w: 4 * w + 4]
        sums = _window_sums(model, window[:3], ws[:3])
        large = _window_sums(model, window, ws)
        norms.append(torch.sqrt(sum((g / sum(ws)).pow(2).sum() for g in large.values())).item())
        for (x, y), wt in zip(window[:3], ws[:3]):
            acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=wt)
            acc.zero_grad()
        view = acc.state.accumulated_gradients
        assert set(view) == set(sums)
        for n in sums:
            torch.testing.assert_close(view[n], sums[n], rtol=1e-12, atol=1e-14)
        with pytest.raises(TypeError):
            view["0.weight"] = torch.zeros(1)  # read-only mapping
        x, y = window[3]
        acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y), weight=ws[3])
        acc.zero_grad()
        assert acc.state.accumulated_gradients == {}  # the window closed
        assert acc.state.last_gradient_norm == pytest.approx(norms[-1], rel=1e-12)
    assert acc.state.average_gradient_norm == pytest.approx(sum(norms) / 2, rel=1e-12)
    assert acc.get_accumulation_stats()["average_gradient_norm"] == acc.state.average_gradient_norm
    assert not acc.state.nan_detected and not acc.state.overflow_detected
    x, y = batches[0]
    acc.accumulate_gradients(nn.functional.cross_entropy(model(x.clone().fill_(float("nan"))), y))
    acc.flush()  # skipped: non-finite
    st = acc.state
    assert st.nan_detected and not st.overflow_detected and st.skipped_optimizer_steps == 1
    assert st.average_gradient_norm == pytest.approx(sum(norms) / 2, rel=1e-12)  # a skipped window: not in the mean


def test_state_nan_detected_counts_dropped_micro_batches():
    model, batches = _mlp(), _batches()
    batches[1] = (batches[1][0].clone().fill_(float("nan")), batches[1][1])
    acc = _sgd_run(GradientAccumulationConfig(accumulation_steps=4, nan_handling=True, nan_policy="drop"),
                   model, batches)
    st = acc.state
    assert st.total_optimizer_steps == 1 and st.skipped_optimizer_steps == 0 and st.nan_detected


def test_setup_errors_name_the_seed_options():
    model = _mlp()
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.LAYER_WISE, layer_accumulation_weights={"fc9.weight": 0.5})
    with pytest.raises(ValueError, match=r"Invalid layer_accumulation_weights: \['fc9.weight'\]") as info:
        GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert "layer_weights" not in str(info.value).replace("layer_accumulation_weights", "")
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.PARAMETER_GROUPS,
                                     parameter_group_weights={"group_0": 1.0, "group_5": 0.5})
    with pytest.raises(ValueError, match=r"Invalid parameter_group_weights key: 'group_5'"):
        GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(groups, lr=0.1))
    cfg = GradientAccumulationConfig(strategy=AccumulationStrategy.PARAMETER_GROUPS, parameter_group_weights=[1.0])
    with pytest.raises(ValueError, match=r"Invalid parameter_group_weights: \[1.0\] \(expected 2 weights"):
        GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(groups, lr=0.1))
    cfg = GradientAccumulationConfig(mode=AccumulationMode.SELECTIVE, exclude_parameters=["nope.*"])
    with pytest.raises(ValueError, match=r"Invalid exclude_parameters: \['nope.\*'\] match no parameter name"):
        GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ the reference's result keys and state fields
class _NoHostRead:
    """Inside the block any host read of a tensor (.item(), float(), bool(), .tolist()) raises."""

    def __init__(self, monkeypatch):
        self.patch = monkeypatch

    def __enter__(self):
        self.ctx = self.patch.context()
        patch = self.ctx.__enter__()

        def no_read(*args, **kwargs):
            raise AssertionError("host read of a tensor on a micro-step that does not update")

        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            patch.setattr(torch.Tensor, name, no_read)

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


@pytest.mark.parametrize("mode", [AccumulationMode.STANDARD, AccumulationMode.EFFICIENT])
def test_accumulate_gradients_returns_the_reference_keys_as_device_tensors(mode, monkeypatch):
    model, batches = _mlp(), _batches(k=7)
    acc = GradientAccumulator(GradientAccumulationConfig(mode=mode, accumulation_steps=3, effective_batch_size=8),
                              model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    outs, window = [], []
    for i, (x, y) in enumerate(batches):
        loss = nn.functional.cross_entropy(model(x), y)
        window.append(loss.item())  # the reference's running total, computed outside the accumulator
        if i % 3 == 2:
            out = acc.accumulate_gradients(loss)
        else:
            with _NoHostRead(monkeypatch):
                out = acc.accumulate_gradients(loss)  # no host read on a micro-step that does not update
        acc.zero_grad()
        assert {"loss", "accumulated_loss", "accumulation_step", "should_optimize", "effective_batch_size"} <= set(out)
        for key in ("loss", "accumulated_loss"):
            assert isinstance(out[key], torch.Tensor) and out[key].ndim == 0 and not out[key].requires_grad
        assert out["accumulated_loss"].item() == pytest.approx(math.fsum(window), rel=1e-12)
        assert out["effective_batch_size"] == 24
        outs.append(out)
        if out["should_optimize"]:
            window = []
    assert [o["accumulation_step"] for o in outs] == [1, 2, 3, 1, 2, 3, 1]
    assert [o["should_optimize"] for o in outs] == [False, False, True] * 2 + [False]
    acc.optimizer.discard()  # 7 micro-batches, K=3: the last window stays open on purpose


def _norm_of(grads) -> float:
    return math.sqrt(math.fsum(g.pow(2).sum().item() for g in grads.values()))


def test_state_keeps_the_recent_update_norms_and_the_epoch(tmp_path):
    model, batches = _mlp(), _batches(k=8)
    cfg = GradientAccumulationConfig(mode=AccumulationMode.PROGRESSIVE, accumulation_schedule=[2], nan_handling=True)
    acc = GradientAccumulator(cfg, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    st = acc.state
    assert st.gradient_norms == () and st.epoch == 0
    expected = []
    for w in range(4):
        window = batches[2 * w: 2 * w + 2]
        expected.append(_norm_of(_large_grad(model, window)))  # independent: autograd on the large batch
        acc.set_epoch(w)
        for x, y in window:
            acc.accumulate_gradients(nn.functional.cross_entropy(model(x), y)); acc.zero_grad()
    x, y = batches[0]
    acc.accumulate_gradients(nn.functional.cross_entropy(model(x.clone().fill_(float("nan"))), y))
    acc.flush()  # skipped: not an update, so not in the history
    st = acc.state
    assert st.epoch == 3 and st.skipped_optimizer_steps == 1
    assert st.gradient_norms == pytest.approx(expected, rel=1e-12)
    assert st.last_gradient_norm != st.gradient_norms[-1]  # the skipped window's norm (NaN) is the last one
    assert st.average_gradient_norm == pytest.approx(sum(expected) / 4, rel=1e-12)
    acc.save_accumulation_state(tmp_path / "acc.pt")
    m2 = _mlp()
    acc2 = GradientAccumulator(cfg, model=m2, optimizer=torch.optim.SGD(m2.parameters(), lr=0.1))
    acc2.load_accumulation_state(tmp_path / "acc.pt")
    assert acc2.state.gradient_norms == st.gradient_norms and acc2.state.epoch == 3


def test_gradient_norm_history_is_bounded():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=1), model=model,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # the norm grows with i
    x = torch.randn(4, 2, dtype=torch.float64)
    for i in range(1003):
        acc.accumulate_gradients(model(x * (1 + i)).pow(2).mean()); acc.zero_grad()
    norms = acc.state.gradient_norms
    assert len(norms) == 1000 and acc.state.total_optimizer_steps == 1003
    assert norms[-1] == acc.state.last_gradient_norm and norms[0] < norms[-1]  # the most recent ones


def _snapshot(acc):
    sd = acc.state_dict()
    return sd, [p.detach().clone() for p in acc.optimizer.param_groups[0]["params"]]


def _assert_unchanged(acc, snap):
    sd, params = snap
    now, now_params = _snapshot(acc)
    assert all(torch.equal(p, q) for p, q in zip(params, now_params))
    assert _same(now, sd)


def _same(a, b) -> bool:
    """Equal trees: same keys, same types, tensors equal bit for bit (NaN included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


@pytest.mark.parametrize("tamper", ["config", "memory", "window_samples", "norms", "not_a_state"])
def test_a_file_that_does_not_fit_is_refused_changing_nothing(tmp_path, tamper):
    from accumopt.checkpoint import load_checkpoint, save_checkpoint

    def build(k=4):
        model = _mlp()
        acc = GradientAccumulator(GradientAccumulationConfig(accumulation_steps=k), model=model,
                                  optimizer=torch.optim.Adam(model.parameters(), lr=0.01))
        return model, acc

    batches = _batches(k=6)
    m1, a1 = build()
    for x, y in batches:
        a1.accumulate_gradients(nn.functional.cross_entropy(m1(x), y)); a1.zero_grad()
    a1.save_accumulation_state(tmp_path / "acc.pt")
    sd, extra = load_checkpoint(tmp_path / "acc.pt")
    own = extra["accumulator"]
    if tamper == "config":
        own["config"]["accumulation_steps"] = 8
    elif tamper == "not_a_state":
        extra = {"something": "else"}
    elif tamper == "window_samples":
        del own["window_samples"]
    else:
        own[tamper] = "oops"
    save_checkpoint(tmp_path / "bad.pt", sd, extra)
    m2, a2 = build()
    x, y = batches[0]
    a2.accumulate_gradients(nn.functional.cross_entropy(m2(x), y)); a2.zero_grad()  # a window in progress
    snap = _snapshot(a2)
    with pytest.raises(ValueError, match="different configuration" if tamper == "config" else
                       "Invalid (accumulation state|checkpoint file)"):
        a2.load_accumulation_state(tmp_path / "bad.pt")
    _assert_unchanged(a2, snap)
    assert a2.state.accumulation_step == 1 and a2.state.total_steps == 1
