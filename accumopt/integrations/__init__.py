"""Adapters for training frameworks: Hugging Face ``Trainer``, Lightning and Accelerate (docs/integrations.md).

Each framework has its own submodule, imported only when you import it, so that ``import accumopt`` never
imports a framework: ``accumopt.integrations.transformers``, ``.lightning`` and ``.accelerate``.
"""

from __future__ import annotations

__all__: list[str] = []  # the submodules are imported explicitly, never from here
