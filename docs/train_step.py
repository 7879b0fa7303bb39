"""Float32 training images/s of the code on PYTHONPATH: PixelCNN 40/1/5, batch 32, dropout 0.5,
one forward, discretized_mix_logistic_loss, backward and Adam step, timed over 8 steps after one.
Run it on two checkouts, alternating, to compare commits:

    PYTHONPATH=. python docs/train_step.py
    PYTHONPATH=/path/to/other/checkout python docs/train_step.py
"""

import time

import torch

from model import PixelCNN
from utils import discretized_mix_logistic_loss

torch.manual_seed(0)
x = torch.rand(32, 3, 32, 32) * 2 - 1                                   # (32, 3, 32, 32)
y = torch.randint(0, 4, (32,))
model = PixelCNN(nr_resnet=1, nr_filters=40, nr_logistic_mix=5, dropout=0.5)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)


def step():
    loss = discretized_mix_logistic_loss(x, model(x, y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


step()
start = time.perf_counter()
for _ in range(8):
    step()
print(f"{32 * 8 / (time.perf_counter() - start):.1f} images/s")
