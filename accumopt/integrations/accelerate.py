"""Hugging Face Accelerate with accumopt doing the gradient accumulation.

The working combination: an ``Accelerator`` with ``gradient_accumulation_steps=1``
(the default), ``accelerator.prepare`` of the :class:`~accumopt.AccumulatingOptimizer`,
and the LR scheduler given to the wrapper (``scheduler=``), not to ``prepare``::

    accelerator = Accelerator()
    model, loader = accelerator.prepare(model, loader)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = AccumulatingOptimizer(inner, 8, scheduler=LambdaLR(inner, f), max_grad_norm=1.0, model=model)
    prepared = prepare(accelerator, opt)    # accelerator.prepare(opt), after the checks below
    for x, y in loader:
        accelerator.backward(loss_fn(model(x), y))   # or opt.backward(loss, weight=n_tokens)
        prepared.step()
        prepared.zero_grad()
    opt.flush()

``accelerator.accumulate(model)`` is then harmless (with one accumulation step it
synchronises on every micro-batch and changes nothing), but not needed.

What goes wrong otherwise, and is refused by :func:`prepare` / :func:`check_accelerator`:

* ``Accelerator(gradient_accumulation_steps=n)`` with n > 1: ``accelerator.backward``
  divides every loss by n, and under ``accumulate()`` the prepared optimizer calls
  the wrapper's ``step()`` only every n-th micro-batch: two accumulations on top of
  each other.
* an LR scheduler passed to ``prepare``: Accelerate steps it on every micro-batch
  (every ``opt.step()`` call). Give it to the wrapper, which steps it once per real update.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import AccumulatingOptimizer

__all__ = ["check_accelerator", "prepare"]


def check_accelerator(accelerator: Any) -> None:
    """Raise ``ValueError`` when ``accelerator`` would accumulate gradients itself.

    Args:
        accelerator: an ``accelerate.Accelerator``.
    """
    steps = getattr(accelerator, "gradient_accumulation_steps", None)
    if steps is None:
        raise TypeError(f"Invalid accelerator: {type(accelerator).__name__} (expected an accelerate.Accelerator)")
    if steps != 1:
        raise ValueError(
            f"Invalid Accelerator(gradient_accumulation_steps={steps}) with an AccumulatingOptimizer (expected 1: "
            "accumopt accumulates; Accelerate would divide each loss by the steps and skip the wrapper's step() "
            "inside accumulate(), accumulating twice). Set the steps on the AccumulatingOptimizer only.")


def prepare(accelerator: Any, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)`` after checking the combination with accumopt.

    Raises ``ValueError`` for an accumulating ``accelerator`` (see
    :func:`check_accelerator`) and for an LR scheduler attached to an
    ``AccumulatingOptimizer`` or to the optimizer it wraps (Accelerate would step it on
    every micro-batch: pass it as ``AccumulatingOptimizer(..., scheduler=...)``).
    Nothing is prepared when a check fails.
    """
    check_accelerator(accelerator)
    wrapped = [o for o in objects if isinstance(o, AccumulatingOptimizer)]
    owners = {id(o) for o in wrapped} | {id(o.optimizer) for o in wrapped}
    for obj in objects:
        target = getattr(obj, "optimizer", None)
        if target is not None and not isinstance(obj, AccumulatingOptimizer) and hasattr(obj, "get_last_lr") \
                and (id(target) in owners or isinstance(target, AccumulatingOptimizer)):
            raise ValueError(
                f"Invalid prepare({type(obj).__name__}) of a scheduler on an AccumulatingOptimizer (Accelerate "
                "would step it on every micro-batch): pass it as AccumulatingOptimizer(..., scheduler=...), which "
                "steps it once per real update")
    return accelerator.prepare(*objects, **kwargs)
