"""The plain training loop with accumopt: one line changes (run: python examples/plain_loop.py)."""

import torch
from torch import nn

import accumopt

torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x @ torch.randn(20, 4)).argmax(1)  # a learnable synthetic task
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
loss_fn = nn.CrossEntropyLoss()

inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=5 * (len(loader) + 7) // 8)
opt = accumopt.AccumulatingOptimizer(inner, accumulation_steps=8, scheduler=sched)  # the one line

for epoch in range(5):
    for xb, yb in loader:                        # micro-batches of 32; an update every 8: batch 256
        loss = loss_fn(model(xb), yb)            # the plain mean loss, no "/ 8"
        opt.backward(loss, weight=len(xb))       # weighted by sample count (exact for a short last batch)
        opt.step(loss=loss)
        opt.zero_grad()
    opt.flush()                                  # the epoch's last, partial window
    s = opt.stats()                              # the only host sync for statistics
    print(f"epoch {epoch}: loss {s['last_loss']:.4f}, {s['updates']} updates, lr {inner.param_groups[0]['lr']:.2e}")
