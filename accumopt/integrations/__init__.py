"""Adapters for training frameworks: Hugging Face ``Trainer``, Lightning and Accelerate.

Each framework has its own module, imported only when you import it, so that
``import accumopt`` (and ``import accumopt.integrations``) never imports a
framework; torch stays the only hard dependency::

    from accumopt.integrations.transformers import AccumulatingTrainer
    from accumopt.integrations.lightning import AccumulationCallback, WeightedBackwardMixin
    from accumopt.integrations.accelerate import prepare, check_accelerator

See ``docs/integrations.md`` for the minimal working code for each framework.
"""

from __future__ import annotations

__all__: list[str] = []  # the submodules are imported explicitly, never from here
