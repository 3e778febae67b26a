"""Shared helpers for the benchmarks: machine description, a GPT-style model, tables, statistics."""

from __future__ import annotations

import math
import os
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "GPT_CONFIGS", "machine_info", "markdown_table", "median", "quantiles", "command_line"]


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> list[tuple[str, str]]:
    """(key, value) rows describing the machine and software, for the report."""
    rows = [
        ("command", command_line()),
        ("CPU", f"{_cpu_model()} ({os.cpu_count()} logical cores visible, torch threads: {torch.get_num_threads()})"),
        ("torch", torch.__version__),
        ("python", platform.python_version()),
    ]
    try:
        rows.append(("load average (1, 5, 15 min)", ", ".join(f"{x:.2f}" for x in os.getloadavg())))
    except OSError:
        pass
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows.append(("GPU", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, CUDA {torch.version.cuda}"))
    return rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quantiles(xs: list[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles (the spread reported next to medians)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


# --------------------------------------------------------------------------- GPT
@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0


GPT_CONFIGS = {
    # GPT-2 small shape (weights tied): 124M parameters; the "124M" case.
    "gpt-124m": GPTConfig(),
    # A small GPT for the launch-bound case (about 20M parameters).
    "gpt-20m": GPTConfig(block_size=256, n_layer=8, n_head=8, n_embd=256),
}


class _Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd)
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd)
        self.ln_2 = nn.LayerNorm(c.n_embd)
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd)
        self.mlp_proj = nn.Linear(4 * c.n_embd, c.n_embd)
        self.n_head = c.n_head
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """A minimal GPT-2-style language model (pre-LayerNorm, tied embeddings)."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(_Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
