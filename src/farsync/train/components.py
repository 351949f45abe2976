"""The parts every trainer builds from a config: device, model, inner optimizer, learning-
rate schedule, one stand-alone inner step, and the evaluation of a set of parameters.

The training loop (:mod:`farsync.train.loop`), the planner's rehearsal
(:mod:`farsync.plan.run`) and the federated client (:mod:`farsync.federated.core`) all
take them from here, so a worker trains the same way whoever drives it. Nothing here
knows of workers, exchanges or the loop.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from farsync.train.config import Config, ConfigError


def device(cfg: Config, local_rank: int = 0) -> torch.device:
    """``train.device``: cuda (the ``local_rank``-th GPU of this machine) when asked for, or
    with ``auto`` when one is there; else the CPU."""
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast(dev: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()


def build_model(cfg: Config, vocab_size: int, dev: torch.device) -> torch.nn.Module:
    """farsync's Llama of ``model.size``, or the transformers architecture of
    ``model.hf_config``; random weights, the same on every worker (seeded by train.seed)."""
    from farsync.models import Llama, model_config

    torch.manual_seed(cfg.train.seed)  # every worker starts from the same θ_g
    if cfg.model.hf_config:
        from farsync.models.hf import HFCausalLM

        try:
            return HFCausalLM.from_config_file(cfg.model.hf_config, vocab_size, cfg.model.seq_len).to(dev)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    mcfg = model_config(cfg.model.size, vocab_size, cfg.model.seq_len, z_loss=cfg.model.z_loss,
                        qk_norm=cfg.model.qk_norm)
    return Llama(mcfg).to(dev)


def model_name(cfg: Config, model: torch.nn.Module) -> str:
    """``model.size``, or the transformers class and its config file."""
    if cfg.model.hf_config:
        return f"{type(model.hf).__name__} from {cfg.model.hf_config}"
    return cfg.model.size


def inner_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The inner optimizer of every worker: AdamW with the compensated weight decay."""
    o = cfg.optim
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=cfg.inner_weight_decay())


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to min_lr_ratio × lr at the last step: the factor
    on optim.lr at schedule step ``step`` (0-based)."""
    o, total = cfg.optim, cfg.train.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def lr_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The inner optimizer's learning-rate schedule (:func:`lr_lambda`), stepped once per
    schedule step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def clip_gradients(cfg: Config, model: torch.nn.Module) -> None:
    """optim.grad_clip on the gradient norm (0: nothing)."""
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss of one batch, its gradients accumulated into the parameters."""
    with autocast(x.device):
        _, loss = model(x, y)
    loss.backward()
    return loss.detach()


def local_step(cfg: Config, model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> float:
    """One inner step with no strategy around it (a federated client, the planner's
    rehearsal): forward and backward as training does them, clipping, the optimizer step;
    the loss."""
    loss = forward_backward(model, x, y)
    clip_gradients(cfg, model)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


@torch.no_grad()
def evaluate(eval_model: torch.nn.Module, parameters: dict[str, torch.Tensor], batches, dev: torch.device) -> float:
    """Mean held-out loss of ``parameters`` (by name; θ_g) loaded into ``eval_model``."""
    for name, p in eval_model.named_parameters():
        p.copy_(parameters[name])
    eval_model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast(dev):
            _, loss = eval_model(x.to(dev), y.to(dev))
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    return total / count


def parallelize(cfg: Config, model: torch.nn.Module, site, dev: torch.device) -> torch.nn.Module:
    """A worker that is a site of R ranks (``site``: :class:`farsync.comm.rendezvous.SiteInfo`)
    trains as one replica (``site.parallel``): with ``ddp`` the model to run forward and
    backward through is a DistributedDataParallel wrapper averaging every gradient over the
    site's ranks (the model itself is its ``.module``); with ``fsdp`` the model is sharded
    in place (FSDP2 ``fully_shard`` on every block, then the whole) over the site's ranks and
    returned as it is. One rank per worker (``site`` None): the model."""
    if site is None:
        return model
    if cfg.site.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, process_group=site.group, device_ids=[dev.index] if dev.type == "cuda" else None)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from farsync.algorithms.fragments import find_blocks

    mesh = DeviceMesh.from_group(site.group, device_type=dev.type)
    found = find_blocks(model)
    for block in (found[1] if found else []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---- state of a sharded (FSDP2) model: each rank saves and loads its own shards ---------

def local_tree(obj):
    """``obj`` with every sharded tensor replaced by this rank's shard (a copy): what a
    checkpoint file holds — tensors and plain data, whatever the parallelism."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.to_local().detach().clone()
    if isinstance(obj, dict):
        return {k: local_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(local_tree(v) for v in obj)
    return obj


def load_model_state(model: torch.nn.Module, state: dict) -> None:
    """The model's state from :func:`local_tree` of its ``state_dict()``: a sharded
    parameter takes this rank's shard, anything else as ``load_state_dict`` would."""
    from torch.distributed.tensor import DTensor

    from farsync.algorithms.fragments import local

    own = model.state_dict()
    if not any(isinstance(v, DTensor) for v in own.values()):
        model.load_state_dict(state)
        return
    missing = sorted(set(own) - set(state)) + sorted(set(state) - set(own))
    if missing:
        raise ValueError(f"checkpoint does not match the model (keys {missing[:3]})")
    with torch.no_grad():
        for name, target in own.items():
            local(target).copy_(state[name])


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """The inner optimizer's state from :func:`local_tree` of its ``state_dict()``: each
    per-parameter tensor of a sharded parameter becomes that parameter's shard again."""
    from torch.distributed.tensor import DTensor

    params = [p for g in opt.param_groups for p in g["params"]]
    fixed = {}
    for i, per in state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            per = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                   if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in per.items()}
        fixed[i] = per
    opt.load_state_dict({**state, "state": fixed})
