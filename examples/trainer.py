"""The documented configuration/trainer API (run: python examples/trainer.py).

GradientAccumulationConfig + GradientAccumulationTrainer: device placement, a progress bar (tqdm when
installed), the last partial window of each epoch applied, a checkpoint every N updates and resume.
"""

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.data as data

try:
    import accumopt  # noqa: F401
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accumopt import AccumulationMode, AccumulationStrategy, GradientAccumulationConfig, GradientAccumulationTrainer

torch.manual_seed(0)
x = torch.randn(1000, 784)
dataset = data.TensorDataset(x, (x @ torch.randn(784, 10)).argmax(1))
folder = tempfile.TemporaryDirectory(prefix="accumopt_trainer_")  # removed at the end (or at exit)
checkpoint = os.path.join(folder.name, "trainer.pt")

config = GradientAccumulationConfig(
    accumulation_steps=4,
    mode=AccumulationMode.STANDARD,
    strategy=AccumulationStrategy.UNIFORM,
    effective_batch_size=16,
    target_batch_size=64,
    gradient_clipping=True,
    clipping_norm=1.0,
    nan_handling=True,
    logging_frequency=5,
    checkpoint_every=10,
    checkpoint_path=checkpoint,
)
trainer = GradientAccumulationTrainer(config)
model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
trainer.setup_training(model, optimizer, nn.CrossEntropyLoss(), scheduler)

train_loader = data.DataLoader(dataset, batch_size=16, shuffle=True)   # 63 batches: the last window is partial
history = trainer.train(train_loader, num_epochs=3)
for h in history:
    print(f"epoch {h['epoch']}: loss {h['epoch_loss']:.4f}, {h['optimization_steps']} updates of up to "
          f"{h['effective_batch_size']} samples, lr {h['lr']:.1e}")
print({k: v for k, v in trainer.accumulator.get_accumulation_stats().items()
       if k in ("total_optimizer_steps", "average_gradient_norm", "nan_detected", "effective_batch_size")})

# Resume: a fresh trainer continues from the last checkpoint (written every 10 updates).
resumed = GradientAccumulationTrainer(config)
model2 = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
resumed.setup_training(model2, optimizer2, nn.CrossEntropyLoss(),
                       torch.optim.lr_scheduler.StepLR(optimizer2, step_size=20, gamma=0.5))
resumed.train(train_loader, num_epochs=4, resume_from=checkpoint)
print(f"resumed from {checkpoint}: {len(resumed.training_history)} epochs in its history")
folder.cleanup()
