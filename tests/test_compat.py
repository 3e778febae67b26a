"""Drop-in compatibility with torch.optim: shared containers, hooks, copies, variants, exotic parameters."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from accumopt import AccumulatingOptimizer
from accumopt.testing import check_equivalence

MODES = ["inplace", "buffered"]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def _data(n: int, micro: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(micro, 3, generator=g, dtype=torch.float64),
             torch.randn(micro, 2, generator=g, dtype=torch.float64)) for _ in range(n)]


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def _train(model, opt, data):
    for batch in data:
        _mse(model, batch).backward()
        opt.step()
        opt.zero_grad()


# ------------------------------------------------------------ shared containers
def test_shares_containers_and_is_an_optimizer():
    inner = torch.optim.AdamW(_model().parameters(), lr=1e-3)
    opt = AccumulatingOptimizer(inner, 4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults
    assert opt.step.__func__ is AccumulatingOptimizer.step  # an ordinary bound method (LRScheduler patches __func__)
    assert "accumulation_steps=4" in repr(opt) and "AdamW" in repr(opt)


# ----------------------------------------------------------------------- hooks
def test_step_hooks_fire_once_per_real_update_in_torch_order_and_removal_works():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AccumulatingOptimizer(inner, 3)
    events: list[tuple[str, bool]] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: events.append(("global-pre", o is inner))),
        register_optimizer_step_post_hook(lambda o, a, k: events.append(("global-post", o is inner))),
        opt.register_step_pre_hook(lambda o, a, k: events.append(("local-pre", o is opt))),
        opt.register_step_post_hook(lambda o, a, k: events.append(("local-post", o is opt))),
    ]
    try:
        _train(model, opt, _data(6))
        assert events == [("global-pre", True), ("local-pre", True), ("local-post", True), ("global-post", True)] * 2
        # torch's own order, for the same hooks on a plain optimizer
        plain_events: list[str] = []
        plain = torch.optim.SGD(model.parameters(), lr=0.1)
        extra = [plain.register_step_pre_hook(lambda *a: plain_events.append("local-pre")),
                 plain.register_step_post_hook(lambda *a: plain_events.append("local-post"))]
        events.clear()
        plain.step()
        assert [e for e, _ in events][:1] == ["global-pre"] and [e for e, _ in events][-1:] == ["global-post"]
        assert plain_events == ["local-pre", "local-post"]
        for h in extra:
            h.remove()
        for h in handles[2:]:
            h.remove()
        events.clear()
        _train(model, opt, _data(3))
        assert events == [("global-pre", True), ("global-post", True)]
    finally:
        for h in handles:
            h.remove()
    events.clear()
    _train(model, opt, _data(3))
    assert events == []


def test_pre_hook_is_not_called_between_boundaries():
    model = _model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.pending))
    _train(model, opt, _data(7))
    assert seen == [4]  # fired once, with the whole window pending
    opt.discard()  # 7 micro-batches, K=4: the last window stays open on purpose


# ------------------------------------------------------------------ copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("mode", MODES)
def test_copy_at_boundary_continues_identically(how, mode):
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.05)
    opt = AccumulatingOptimizer(inner, 2, mode=mode, scheduler=torch.optim.lr_scheduler.StepLR(inner, 1, 0.5))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)  # a scheduler built on the wrapper patches opt.step
    data = _data(8)
    _train(model, opt, data[:4])
    assert opt.pending == 0
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert (opt2.accumulation_steps, opt2.num_updates, opt2.pending) == (2, 2, 0)
    assert opt2.param_groups is opt2.optimizer.param_groups
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    _train(model, opt, data[4:])
    _train(model2, opt2, data[4:])
    assert opt2.num_updates == opt.num_updates == 4
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.scheduler.last_epoch == opt.scheduler.last_epoch == 4


def test_copy_does_not_step_the_original():
    """A scheduler built on the wrapper patches ``opt.step``; the copy must not call back into the original."""
    model = _model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 1)
    torch.optim.lr_scheduler.StepLR(opt, 1)
    model2, opt2 = copy.deepcopy((model, opt))
    _train(model2, opt2, _data(2))
    assert opt2.num_updates == 2 and opt.num_updates == 0


@pytest.mark.parametrize("mode", MODES)
def test_add_param_group_after_deepcopy(mode):
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    opt = AccumulatingOptimizer(torch.optim.SGD(model["a"].parameters(), lr=0.1), 2, mode=mode)
    model2, opt2 = copy.deepcopy((model, opt))
    opt2.add_param_group({"params": list(model2["b"].parameters())})
    stored = list(opt2._store.params)
    assert len(stored) == 4 and len({id(p) for p in stored}) == 4


# ---------------------------------------------------------------- torch utilities
def test_clip_grad_norm_and_schedulers_accept_it():
    model = _model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=2)  # no TypeError
    _mse(model, _data(1)[0]).backward()
    norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    assert torch.isfinite(norm)
    opt.step()
    assert sched.get_last_lr() == [0.05]
    opt.discard()  # one micro-batch of two: the window stays open on purpose


def test_max_grad_norm_equals_clipping_the_large_batch_gradient():
    model = _model()
    ref_model = copy.deepcopy(model)
    data = _data(4)
    opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 4, max_grad_norm=0.05)
    _train(model, opt, data)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    _mse(ref_model, (torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]))).backward()
    assert torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05) > 0.05  # clipping is active
    ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=0.0)


# ---------------------------------------------------------- optimizer variants
VARIANTS = {
    "SGD": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "Adam": (torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
    "AdamW": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.1)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_foreach_forloop_fused_variants_agree(name, mode):
    cls, kwargs = VARIANTS[name]
    data = [(torch.cat([d[0] for d in _data(9)[i:i + 3]]), torch.cat([d[1] for d in _data(9)[i:i + 3]]))
            for i in (0, 3, 6)]
    finals = {}
    for variant in ({"foreach": False}, {"foreach": True}, {"fused": True}):
        report = check_equivalence(_model, _mse, lambda m: cls(m.parameters(), **kwargs, **variant), data, 3, mode=mode)
        assert report.max_deviation <= 1e-10
        model = _model()
        opt = AccumulatingOptimizer(cls(model.parameters(), **kwargs, **variant), 3, mode=mode)
        _train(model, opt, _data(9))
        finals[str(variant)] = [p.detach().clone() for p in model.parameters()]
    first = next(iter(finals.values()))
    for params in finals.values():
        for p, q in zip(params, first):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------ exotic parameters
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.SGD])
def test_complex_params_match_view_as_real_twins(cls, foreach, mode):
    torch.manual_seed(2)
    pc = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex128))
    pr = torch.nn.Parameter(torch.view_as_real(pc.detach().clone()))
    kw = dict(lr=0.05, foreach=foreach) | ({"momentum": 0.9} if cls is torch.optim.SGD else {})
    oc = AccumulatingOptimizer(cls([pc], **kw), 3, mode=mode)
    orr = AccumulatingOptimizer(cls([pr], **kw), 3, mode=mode)
    for _ in range(9):
        x = torch.randn(2, dtype=torch.complex128)
        (pc @ x).abs().pow(2).sum().backward()
        oc.step()
        oc.zero_grad()
        (torch.view_as_complex(pr) @ x).abs().pow(2).sum().backward()
        orr.step()
        orr.zero_grad()
    assert oc.num_updates == 3
    torch.testing.assert_close(torch.view_as_real(pc), pr, rtol=1e-12, atol=1e-14)
    assert not torch.equal(pc, torch.view_as_complex(pr.detach()).new_zeros(3, 2))


class _Odd(torch.nn.Module):
    """A non-contiguous weight and a zero-size parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(2, 3).t())  # (3, 2), non-contiguous
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))
        self.b = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x @ self.w + self.b + (x @ self.empty.t()).sum()


@pytest.mark.parametrize("mode", MODES)
def test_zero_size_and_non_contiguous_params(mode):
    assert not _Odd().w.is_contiguous()
    report = check_equivalence(_Odd, _mse, lambda m: torch.optim.Adam(m.parameters(), lr=0.05, foreach=True),
                               [(torch.cat([d[0] for d in _data(4)]), torch.cat([d[1] for d in _data(4)]))] * 3,
                               4, mode=mode)
    assert report.parameters["empty"] == 0.0 and report.parameters["w"] <= 1e-10


@pytest.mark.parametrize("load", ["wrapper", "inner"])
def test_containers_stay_shared_after_load_state_dict(load):
    """torch's Optimizer.load_state_dict replaces param_groups and state: the wrapper follows."""
    model = _model()
    inner = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    opt = AccumulatingOptimizer(inner, 2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)  # built on the wrapper
    _train(model, opt, _data(2))
    sd = opt.state_dict() if load == "wrapper" else inner.state_dict()
    (opt if load == "wrapper" else inner).load_state_dict(sd)  # torch's own load replaces inner's lists
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler reaches the wrapped optimizer
    # add_param_group after either load: the new parameters get their accumulation and are trained
    opt.add_param_group({"params": list(model[2].parameters())})
    assert len(list(opt._store.params)) == 4
    head = model[2].weight.detach().clone()
    _train(model, opt, _data(2))
    assert not torch.equal(model[2].weight, head)  # the group added after the load is trained
    assert model[2].weight.grad is None and opt.num_updates == 2 and len(inner.state) == 4


# --------------------------------------------- models no accumulation can match
def _bn_model(norm="bn", eval_bn=False):
    def build():
        layer = torch.nn.BatchNorm1d(8) if norm == "bn" else torch.nn.GroupNorm(2, 8)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), layer, torch.nn.Tanh(), torch.nn.Linear(8, 1))
        if eval_bn:
            model[1].eval()  # running statistics: per-sample
        return model
    return build


def _bn_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(12, 3, generator=g), torch.randn(12, 1, generator=g)) for _ in range(2)]


def _sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def test_check_equivalence_names_batchnorm_in_training_mode():
    from accumopt.testing import batch_dependent_layers

    with pytest.raises(AssertionError) as info:
        check_equivalence(_bn_model(), _mse, _sgd, _bn_batches(), 4)
    text = str(info.value)
    assert "problem: BatchNorm using batch statistics ('1')" in text
    assert "no accumulation can equal the large batch" in text and "GroupNorm or LayerNorm" in text
    assert batch_dependent_layers(_bn_model()()) == ["1"]
    assert batch_dependent_layers(_bn_model(eval_bn=True)()) == []
    no_stats = torch.nn.BatchNorm1d(4, track_running_stats=False).eval()  # batch statistics even in eval mode
    assert batch_dependent_layers(no_stats) == ["<root>"]


@pytest.mark.parametrize("build, k", [(_bn_model(eval_bn=True), 4), (_bn_model("gn"), [5, 4, 3]), (_bn_model(), 1)])
def test_check_equivalence_passes_the_alternatives(build, k):
    # BatchNorm with running statistics, GroupNorm, and BatchNorm in training mode without accumulation (K=1).
    # Measured: 4.3e-16, 5.5e-16 and 0.
    report = check_equivalence(build, _mse, _sgd, _bn_batches(), k)
    assert report.passed and not report.problems and report.max_deviation <= 1e-13
