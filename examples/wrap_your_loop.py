# Streaming DiLoCo around your own model, optimizer and loop.
# Run: torchrun --nproc-per-node=2 examples/wrap_your_loop.py
import torch
import torch.distributed as dist

from farsync import DiLoCo
from farsync.comm import TorchDistributedCommunicator

dist.init_process_group("gloo")  # torchrun provides rank and world size
torch.manual_seed(0)  # every worker starts from the same parameters
model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()) for _ in range(6)])
inner = torch.optim.AdamW(model.parameters(), lr=1e-3)  # your optimizer, unchanged
algo = DiLoCo(model, inner, TorchDistributedCommunicator(),
              mode="streaming", inner_steps=20, fragments=3,  # H, P
              sync_delay=1, codec="fp4-e3m0")  # τ, 4-bit pseudo-gradients
data = torch.Generator().manual_seed(dist.get_rank())  # each worker its own data
for step in range(100):
    x = torch.randn(32, 64, generator=data)
    loss = (model(x) - x.flip(-1)).pow(2).mean()
    loss.backward()
    algo.step()  # inner step; a fragment syncs when due
    inner.zero_grad()
algo.finish()  # sync what trained since the last sync, land what is in flight
if dist.get_rank() == 0:
    s = algo.stats
    print(f"loss {loss.item():.4f}, sent {s.total_bytes:,} bytes, {s.dp_equivalent_bytes / s.total_bytes:.0f}x fewer than DP")
dist.destroy_process_group()
