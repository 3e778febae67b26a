"""Hugging Face Accelerate with accumopt doing the gradient accumulation (docs/integrations.md).

Keep ``Accelerator(gradient_accumulation_steps=1)`` and give the LR scheduler to the wrapper (``scheduler=``),
not to ``prepare``: otherwise Accelerate accumulates on top of accumopt, or steps the scheduler on every
micro-batch. :func:`prepare` is ``accelerator.prepare`` with both checks.
"""

from __future__ import annotations

from typing import Any

from ..optimizer import AccumulatingOptimizer

__all__ = ["check_accelerator", "prepare"]


def check_accelerator(accelerator: Any) -> None:
    """Raise ``ValueError`` when ``accelerator`` (an ``accelerate.Accelerator``) would accumulate gradients itself."""
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

    Raises ``ValueError`` for an accumulating ``accelerator`` (see :func:`check_accelerator`) and for an LR
    scheduler on an ``AccumulatingOptimizer`` or the optimizer it wraps; nothing is prepared then.
    """
    check_accelerator(accelerator)
    wrapped = [o for o in objects if isinstance(o, AccumulatingOptimizer)]
    owners = {id(o) for o in wrapped} | {id(o.optimizer) for o in wrapped}
    for obj in objects:
        target = getattr(obj, "optimizer", None)
        if target is not None and not isinstance(obj, AccumulatingOptimizer) and hasattr(obj, "get_last_lr") \
                and (id(target) in owners or isinstance(target, AccumulatingOptimizer)):
            raise ValueError(f"Invalid prepare({type(obj).__name__}) of a scheduler on an AccumulatingOptimizer "
                             "(Accelerate would step it on every micro-batch): pass it as "
                             "AccumulatingOptimizer(..., scheduler=...), which steps it once per real update")
    return accelerator.prepare(*objects, **kwargs)
