"""Mixed precision with accumopt: autocast + a GradScaler owned by the wrapper (run: python examples/amp.py).

On CUDA this is float16 autocast with dynamic loss scaling; on CPU it runs bfloat16 autocast (no scaler needed:
bfloat16 has float32's range). The scale stays constant within a window; unscale, clipping, the inf/NaN check,
the step and scaler.update() happen once per real update.
"""

import torch
from torch import nn

import accumopt

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.bfloat16
torch.manual_seed(0)
x = torch.randn(2048, 32, device=device)
y = (x @ torch.randn(32, 5, device=device)).argmax(1)
model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 5)).to(device)
loss_fn = nn.CrossEntropyLoss()

scaler = torch.amp.GradScaler(device) if dtype == torch.float16 else None
opt = accumopt.AccumulatingOptimizer(
    torch.optim.AdamW(model.parameters(), lr=2e-3),
    accumulation_steps=4,
    scaler=scaler,          # None on CPU/bfloat16
    max_grad_norm=1.0,      # clips the accumulated (unscaled) gradient, once per window
    nonfinite="skip",       # a window with inf/NaN is skipped and counted
)

for epoch in range(4):
    perm = torch.randperm(len(x), device=device)
    for i in range(0, len(x), 64):
        idx = perm[i:i + 64]
        with torch.autocast(device, dtype=dtype):
            loss = loss_fn(model(x[idx]), y[idx])
        opt.backward(loss)  # applies the scaler's scale when there is one
        opt.step(loss=loss)
        opt.zero_grad()
    opt.flush()
    s = opt.stats()
    print(f"epoch {epoch}: loss {s['last_loss']:.4f}, updates {s['updates']}, skipped {s['skipped_updates']}")
