"""CapturedMicroStep on CPU: the eager path equals the plain wrapper exactly.

Two families of checks:

* eager (what CPU users get): ``step(batch, weight)`` equals the plain loop
  ``loss = loss_fn(model, b); opt.backward(loss, weight=w); opt.step(loss=loss)``
  bit for bit, and the large-batch update in float64.
* simulated capture: the capture bookkeeping (static inputs, static ``.grad``
  sums, gradients handed to buffered groups, recapture on train/eval switches and
  replaced parameters) driven by a CPU stand-in for CUDA graphs whose capture runs
  no kernels (values restored, fresh outputs poisoned with NaN) and whose replays
  write where the capture-time tensors were, whatever Python points at then.
  The real CUDA graphs are tested in tests/gpu/test_gpu_graphs.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import accumopt
from accumopt import AccumulatingOptimizer
from accumopt import graphs as graphs_mod
from accumopt.graphs import CapturedMicroStep, capture_micro_step


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_model(seed=0, dtype=torch.float32, dropout=0.2, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers).to(dtype)


def make_data(n=10, size=4, ragged=3, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = [size] * (n - 1) + [ragged]
    return [(torch.randn(s, 6, generator=g, dtype=dtype), torch.randn(s, 3, generator=g, dtype=dtype)) for s in sizes]


def weights_of(kind, data):
    if kind == "none":
        return [None] * len(data)
    if kind == "number":
        return [float(len(b[0])) for b in data]
    return [torch.tensor(len(b[0])) for b in data]  # a 0-dim (int64) tensor, as a token count


def build(mode, model, k=4, scaler=False):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    kw = {"scaler": torch.amp.GradScaler("cpu", init_scale=2.0**4)} if scaler else {}
    return AccumulatingOptimizer(inner, k, mode=mode, **kw)


def plain_loop(opt, model, data, weights):
    for b, w in zip(data, weights):
        loss = loss_fn(model, b)
        opt.backward(loss, weight=w)
        opt.step(loss=loss)
    opt.flush()


def step_loop(step, opt, data, weights):
    for b, w in zip(data, weights):
        step(b, weight=w)
    opt.flush()


def assert_same(m1, o1, m2, o2):
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n


def lockstep(m1, o1, m2, o2, step, data, seed, before):
    """The same micro-batches through the plain wrapper (m1, o1) and then the captured step on (m2, o2).

    ``before(i, model, opt)`` runs before micro-batch ``i`` in both runs (what the loop changes there).
    """
    for m, o in ((m1, o1), (m2, o2)):
        torch.manual_seed(seed)
        for i, b in enumerate(data):
            before(i, m, o)
            if o is o2:
                step(b)
            else:
                loss = loss_fn(m1, b)
                o1.backward(loss)
                o1.step(loss=loss)
    s1, s2 = o1.optimizer.state_dict()["state"], o2.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for key in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][key]), torch.as_tensor(s2[i][key])), (i, key)
    assert o1.num_updates == o2.num_updates and o1.pending == o2.pending


# ------------------------------------------------------------------ simulated capture
class SimulatedGraphs:
    """CPU stand-in for CUDA graphs (see the module docstring)."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def warmup(self):
        yield

    def get_rng_state(self):
        return torch.get_rng_state()

    def set_rng_state(self, state):
        torch.set_rng_state(state)

    def capture(self, fn, params, generators):
        start = [p.grad for p in params]
        snap = [(t, t.clone()) for t in start if t is not None]
        snap += [(b, b.clone()) for b in self.model.buffers()] + [(p, p.detach().clone()) for p in params]
        rng = torch.get_rng_state()
        out = fn()
        end = [p.grad for p in params]
        with torch.no_grad():
            for t, v in snap:  # a capture launches nothing
                t.copy_(v)
            for e, s in zip(end, start):  # memory allocated during capture holds garbage until a replay
                if e is not None and e is not s:
                    e.fill_(float("nan"))
            out.fill_(float("nan"))
        torch.set_rng_state(rng)

        def replay():
            before = [p.grad for p in params]
            for p, s in zip(params, start):  # kernels write where the capture-time tensors were
                p.grad = s
            new = fn()
            with torch.no_grad():
                for p, e, s in zip(params, end, start):
                    if e is not None and e is not s:
                        e.copy_(p.grad)
                out.copy_(new)
            for p, b in zip(params, before):
                p.grad = b

        return out, replay, None


@pytest.fixture
def simulated(monkeypatch):
    """Let CapturedMicroStep 'capture' on CPU with SimulatedGraphs."""
    models = {}

    def impossible(self):
        self._device = torch.device("cpu")
        models["model"] = self.model
        return None

    monkeypatch.setattr(CapturedMicroStep, "_impossible", impossible)
    monkeypatch.setattr(graphs_mod, "_make_backend", lambda device, mode: SimulatedGraphs(models["model"]))


# ------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("wkind", ["none", "number", "tensor"])
def test_eager_path_equals_plain_wrapper(mode, wkind):
    data = make_data()
    weights = weights_of(wkind, data)
    m1, m2 = make_model(), make_model()
    o1, o2 = build(mode, m1), build(mode, m2)
    torch.manual_seed(5)
    plain_loop(o1, m1, data, weights)
    torch.manual_seed(5)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])
    assert not step.captured and "cpu" in step.fallback_reason
    step_loop(step, o2, data, weights)
    assert step.eager_steps == len(data) and step.replays == 0
    assert_same(m1, o1, m2, o2)


def test_eager_path_with_scaler_and_plain_backward():
    """Unweighted: equal to the most plain loop (loss.backward(); opt.step()), with an owned GradScaler."""
    data = make_data()
    m1, m2 = make_model(), make_model()
    o1, o2 = build("inplace", m1, scaler=True), build("inplace", m2, scaler=True)
    torch.manual_seed(3)
    for b in data:
        o1.backward(loss_fn(m1, b))
        o1.step()
        o1.zero_grad()
    o1.flush()
    torch.manual_seed(3)
    step = capture_micro_step(o2, m2, loss_fn, data[0])
    for b in data:
        loss = step(b)
        assert loss.ndim == 0 and not loss.requires_grad
        o2.zero_grad()
    o2.flush()
    assert_same(m1, o1, m2, o2)


def test_equals_large_batch_float64():
    """Independent reference: sample-weighted micro-batches (ragged last) == one large-batch AdamW step."""
    dtype = torch.float64
    data = make_data(n=4, size=5, ragged=2, dtype=dtype)
    weights = [torch.tensor(float(len(b[0])), dtype=dtype) for b in data]
    m_ref, m_acc = make_model(dtype=dtype, dropout=0.0, bn=False), make_model(dtype=dtype, dropout=0.0, bn=False)
    ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    loss_fn(m_ref, (x, y)).backward()
    ref.step()
    opt = build("buffered", m_acc, k=len(data))
    step = CapturedMicroStep(opt, m_acc, loss_fn, data[0])
    for b, w in zip(data, weights):
        step(b, weight=w)
    assert opt.num_updates == 1
    for a, b in zip(m_ref.parameters(), m_acc.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["inplace", "buffered"])
@pytest.mark.parametrize("wkind", ["none", "number", "tensor"])
def test_simulated_capture_equals_plain_wrapper(simulated, mode, wkind):
    data = make_data(n=11)
    weights = weights_of(wkind, data)
    m1, m2 = make_model(), make_model()
    o1, o2 = build(mode, m1), build(mode, m2)
    torch.manual_seed(7)
    plain_loop(o1, m1, data, weights)
    torch.manual_seed(7)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])
    step_loop(step, o2, data, weights)
    assert step.captured and step.captures == 1
    assert step.replays == len(data) - 1 and step.eager_steps == 1  # the ragged last batch ran eagerly
    assert_same(m1, o1, m2, o2)


def test_simulated_capture_with_scaler_and_dict_batches(simulated):
    data = [{"x": x, "y": y} for x, y in make_data(n=9)]

    def dict_loss(model, b):
        return nn.functional.mse_loss(model(b["x"]), b["y"])

    m1, m2 = make_model(), make_model()
    o1, o2 = build("inplace", m1, scaler=True), build("inplace", m2, scaler=True)
    torch.manual_seed(2)
    for b in data:
        loss = dict_loss(m1, b)
        o1.backward(loss)
        o1.step(loss=loss)
    torch.manual_seed(2)
    step = CapturedMicroStep(o2, m2, dict_loss, data[0])
    losses = [step(b) for b in data]
    assert step.replays == len(data) - 1
    assert len({id(t) for t in losses}) == len(losses)  # each call returns its own tensor
    assert_same(m1, o1, m2, o2)
    assert o1.scaler.get_scale() == o2.scaler.get_scale()
    o1.discard()  # 9 micro-batches, K=4: the last window stays open on purpose
    o2.discard()


def test_simulated_train_eval_switch_and_mid_window_change(simulated):
    data = make_data(n=13, ragged=4)
    m1, m2 = make_model(), make_model()
    o1, o2 = build("inplace", m1), build("inplace", m2)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])
    modes = [True] * 4 + [False] * 4 + [True] * 2 + [False] + [True] * 2  # eval for a window, then mid-window
    torch.manual_seed(4)
    for b, train in zip(data, modes):
        m1.train(train)
        loss = loss_fn(m1, b)
        o1.backward(loss)
        o1.step(loss=loss)
    torch.manual_seed(4)
    for b, train in zip(data, modes):
        m2.train(train)
        step(b)
    assert step.captures == 3  # train, eval (window 2), train again (window 3)
    assert step.eager_steps == 1  # the eval micro-step mid-window 3; the train ones after it replay
    assert_same(m1, o1, m2, o2)
    o1.discard()  # 13 micro-batches, K=4: the last window stays open on purpose
    o2.discard()


def test_simulated_replaced_parameter(simulated):
    data = make_data(n=12, ragged=4)
    m1, m2 = make_model(bn=False), make_model(bn=False)
    o1, o2 = build("inplace", m1), build("inplace", m2)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])

    def new_head(i, m, o):
        if i == 4:  # a new head between windows, added to the optimizer
            torch.manual_seed(8)
            m[-1].weight = nn.Parameter(torch.randn(3, 16) * 0.1)
            o.add_param_group({"params": [m[-1].weight]})

    lockstep(m1, o1, m2, o2, step, data, 6, new_head)
    assert step.captures == 2
    assert_same(m1, o1, m2, o2)


def test_replaced_parameter_outside_optimizer_is_an_error():
    data = make_data(n=8)
    model = make_model(bn=False)
    opt = build("inplace", model)
    step = CapturedMicroStep(opt, model, loss_fn, data[0])
    for b in data[:4]:
        step(b)
    model[-1].weight = nn.Parameter(torch.zeros(3, 16))
    with pytest.raises(ValueError, match=r"\['3.weight'\] require grad but are not in the optimizer"):
        step(data[4])


def test_capture_failure_falls_back_with_warning(simulated):
    data = make_data(n=6, ragged=4)

    def syncing_loss(model, b):
        loss = loss_fn(model, b)
        if graphs_mod_capturing[0]:
            raise RuntimeError("operation not permitted when stream is capturing")
        return loss

    graphs_mod_capturing = [False]
    ref_model = make_model()
    ref = build("inplace", ref_model)
    torch.manual_seed(9)
    for b in data:
        loss = loss_fn(ref_model, b)
        ref.backward(loss)
        ref.step(loss=loss)
    model = make_model()
    opt = build("inplace", model)
    torch.manual_seed(9)
    orig = SimulatedGraphs.capture

    def failing_capture(self, fn, params, generators):
        graphs_mod_capturing[0] = True
        try:
            return orig(self, fn, params, generators)
        finally:
            graphs_mod_capturing[0] = False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SimulatedGraphs, "capture", failing_capture)
        with pytest.warns(RuntimeWarning, match="capture failed: RuntimeError"):
            step = CapturedMicroStep(opt, model, syncing_loss, data[0])
            step(data[0])
        for b in data[1:]:
            step(b)
    assert not step.captured and step.eager_steps == len(data)
    assert opt.num_updates == 1 and opt.pending == 2
    assert_same(ref_model, ref, model, opt)  # warm-up and the failed capture left no trace
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a.grad, b.grad)
    ref.discard()  # the last window stays open on purpose (compared above)
    opt.discard()


# ------------------------------------------------------------------ CUDA backend, mocked
class FakeStreams:
    """Stand-ins for torch.cuda's stream calls on CPU: one 'current stream' variable per process."""

    def __init__(self):
        self.default = self.Stream("default")
        self.current = self.default
        self.waits = []

    def Stream(self, name="side"):  # noqa: N802 - torch.cuda.Stream
        streams = self

        class _Stream:
            def __init__(self, label=name):
                self.label = label

            def wait_stream(self, other):
                streams.waits.append((self.label, other.label))

            def __repr__(self):
                return f"Stream({self.label})"

        return _Stream()

    def stream(self, s):  # torch.cuda.stream: select ``s``, restore on exit
        streams = self

        class _Ctx:
            def __enter__(self):
                self.prev = streams.current
                streams.current = s

            def __exit__(self, *exc):
                streams.current = self.prev

        return _Ctx()

    def set_stream(self, s):
        self.current = s


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's stream and graph calls faked on CPU; torch's own ``torch.cuda.graph`` context is used as is."""
    streams = FakeStreams()
    calls = {}

    class FakeGraph:
        def register_generator_state(self, gen):
            pass

        def capture_begin(self, *pool, capture_error_mode="global", **kw):
            calls["mode"] = capture_error_mode
            calls["begin_stream"] = streams.current

        def capture_end(self):  # the documented fallback case: the capture was invalidated
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", streams.Stream)
    monkeypatch.setattr(torch.cuda, "stream", streams.stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.current)
    monkeypatch.setattr(torch.cuda, "set_stream", streams.set_stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)
    monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", None)
    return streams, calls


@pytest.mark.parametrize("mode", ["global", "thread_local", "relaxed"])
def test_failed_capture_restores_the_current_stream(fake_cuda, mode):
    streams, calls = fake_cuda
    backend = graphs_mod._make_backend(torch.device("cuda", 0), mode)
    with pytest.raises(RuntimeError, match="operation not permitted"):
        backend.capture(lambda: torch.ones(()), [], [])
    assert calls["mode"] == mode  # capture_error_mode reaches torch.cuda.graph
    assert calls["begin_stream"] is not streams.default  # captured on torch's side stream...
    assert streams.current is streams.default  # ...and the stream before the capture is current again


def test_failed_warmup_restores_the_stream_and_joins_the_side_stream(fake_cuda):
    streams, _ = fake_cuda
    backend = graphs_mod._make_backend(torch.device("cuda", 0), "global")
    with pytest.raises(ValueError, match="bad warm-up"):
        with backend.warmup():
            assert streams.current is not streams.default
            raise ValueError("bad warm-up")
    assert streams.current is streams.default
    assert streams.waits == [("side", "default"), ("default", "side")]  # the current stream waited for the side one


def test_middle_parameter_grad_replaced_mid_window(simulated):
    """A .grad replaced mid-window on a middle parameter is carried into the tensor the replays add into."""
    data = make_data(n=12, ragged=4)
    m1, m2 = make_model(bn=False), make_model(bn=False)
    o1, o2 = build("inplace", m1), build("inplace", m2)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])
    assert len(list(m1.parameters())) == 4

    def rescale_middle(i, m, o):
        if i in (5, 9):  # mid-window (K=4): the user rescales one parameter's pending sum
            middle = list(m.parameters())[2]
            middle.grad = middle.grad * 0.5

    lockstep(m1, o1, m2, o2, step, data, 6, rescale_middle)
    assert step.replays == len(data) and step.eager_steps == 0
    assert_same(m1, o1, m2, o2)


@pytest.fixture
def simulated_elsewhere(monkeypatch):
    """Simulated capture for a model 'on' the meta device: every CPU batch is on the wrong device."""
    def impossible(self):
        self._device = torch.device("meta")
        return None

    monkeypatch.setattr(CapturedMicroStep, "_impossible", impossible)
    monkeypatch.setattr(graphs_mod, "_make_backend", lambda device, mode: SimulatedGraphs(None))


@pytest.mark.parametrize("ragged", [False, True])
def test_batch_on_another_device_raises_before_anything(simulated_elsewhere, ragged):
    model = make_model()
    opt = build("inplace", model)
    example = make_data(2)[0]
    step = CapturedMicroStep(opt, model, loss_fn, example)
    batch = make_data(2, ragged=3)[1] if ragged else example  # a ragged batch would run eagerly: same error
    with pytest.raises(ValueError, match=r"^Invalid batch: \[0\] is on cpu \(expected meta, the model's device"):
        step(batch)
    dict_step = CapturedMicroStep(opt, model, lambda m, b: loss_fn(m, (b["x"], b["y"])),
                                  {"x": example[0], "y": example[1]})
    with pytest.raises(ValueError, match=r"^Invalid batch: \['x'\] is on cpu"):
        dict_step({"x": batch[0], "y": batch[1]})
    assert opt.pending == 0 and step.captures == 0 and all(p.grad is None for p in model.parameters())


def test_capture_error_mode_reaches_the_backend(monkeypatch):
    seen = []
    monkeypatch.setattr(CapturedMicroStep, "_impossible", lambda self: setattr(self, "_device", torch.device("cpu")))
    monkeypatch.setattr(graphs_mod, "_make_backend", lambda device, mode: seen.append(mode) or SimulatedGraphs(None))
    model = make_model()
    CapturedMicroStep(build("inplace", model), model, loss_fn, make_data(2)[0], capture_error_mode="thread_local")
    assert seen == ["thread_local"]


def test_module_built_elsewhere_mid_window_keeps_replaying(simulated):
    data = make_data(n=12, ragged=3)
    m1, m2 = make_model(), make_model()
    o1, o2 = build("inplace", m1), build("inplace", m2)
    torch.manual_seed(3)
    plain_loop(o1, m1, data, [None] * len(data))
    torch.manual_seed(3)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])
    others = []
    for i, b in enumerate(data):
        if i in (1, 6):  # mid-window: another model is built (parameters, buffers, submodules registered)
            with torch.random.fork_rng():
                others.append(make_model(seed=i))
        step(b)
    o2.flush()
    assert step.captures == 1 and step.eager_steps == 1  # only the ragged last batch ran eagerly
    assert_same(m1, o1, m2, o2)


def test_buffer_replaced_in_the_model_recaptures(simulated):
    data = make_data(n=12, ragged=4)
    m1, m2 = make_model(), make_model()
    o1, o2 = build("inplace", m1), build("inplace", m2)
    step = CapturedMicroStep(o2, m2, loss_fn, data[0])

    def new_buffer(i, m, o):
        if i == 6:  # mid-window: a BatchNorm buffer is replaced by a new tensor
            m[1].running_var = torch.full((16,), 2.0)

    lockstep(m1, o1, m2, o2, step, data, 5, new_buffer)
    assert step.captures == 2  # the model's own registration: eager for the rest of that window, then recaptured
    assert step.eager_steps == 2  # micro-steps 6 and 7
    assert_same(m1, o1, m2, o2)


def _bad(**kw):
    model = make_model()
    args = dict(optimizer=build("inplace", model), model=model, loss_fn=loss_fn, example_batch=make_data(2)[0])
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kw, exc, message",
    [
        ({"optimizer": "sgd"}, TypeError, "Invalid optimizer: str (expected an accumopt.AccumulatingOptimizer"),
        ({"model": 3}, TypeError, "Invalid model: int (expected a torch.nn.Module)"),
        ({"loss_fn": 1.0}, TypeError, "Invalid loss_fn: 1.0 (expected a callable loss_fn(model, batch) -> loss)"),
        ({"capture": "yes"}, TypeError, "Invalid capture: 'yes' (expected None, True or False)"),
        ({"warmup_steps": 0}, ValueError, "Invalid warmup_steps: 0 (expected an int >= 1)"),
        ({"generators": [1]}, TypeError, "Invalid generators: 1 (expected torch.Generator objects)"),
        ({"example_batch": (1, "a")}, ValueError, "Invalid example_batch: tuple holds no tensor"),
        ({"capture_error_mode": "local"}, ValueError,
         "Invalid capture_error_mode: 'local' (expected one of 'global', 'thread_local', 'relaxed')"),
        ({"capture": True}, ValueError, "Invalid capture: True, but the micro-step cannot be captured: parameters on cpu"),
    ],
)
def test_bad_arguments(kw, exc, message):
    args = _bad(**kw)
    with pytest.raises(exc) as info:
        CapturedMicroStep(args.pop("optimizer"), args.pop("model"), args.pop("loss_fn"), args.pop("example_batch"), **args)
    assert message in str(info.value)


def test_parameter_outside_optimizer_rejected():
    model = make_model()
    opt = AccumulatingOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), 2)
    with pytest.raises(ValueError, match=r"parameters \['1.weight', '1.bias', '4.weight', '4.bias'\] require grad but are not in the optimizer"):
        CapturedMicroStep(opt, model, loss_fn, make_data(2)[0])


def test_bad_loss_result_changes_nothing():
    model = make_model()
    opt = build("inplace", model)
    step = CapturedMicroStep(opt, model, lambda m, b: m(b[0]), make_data(2)[0])
    with pytest.raises(TypeError, match=r"Invalid loss_fn result: \(4, 3\) \(expected a one-element loss tensor\)"):
        step(make_data(2)[0])
    assert opt.pending == 0 and all(p.grad is None for p in model.parameters())


def test_exported():
    assert accumopt.CapturedMicroStep is CapturedMicroStep
    assert accumopt.capture_micro_step is capture_micro_step


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def test_recapture_of_an_eager_only_step_is_a_no_op() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(4)]
    for capture in (None, False):
        model = nn.Linear(6, 3)
        opt = AccumulatingOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), 2)
        step = CapturedMicroStep(opt, model, _mse, data[0], capture=capture)
        reason = step.fallback_reason
        assert reason is not None and not step.captured
        step.recapture()
        assert step.fallback_reason == reason
        for b in data:
            step(b)
            step.recapture()
        assert step.eager_steps == 4 and opt.num_updates == 2
