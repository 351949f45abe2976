"""Split a model's parameters into the P fragments Streaming DiLoCo syncs one at a time.

Automatic rule (models that keep their blocks in an ``nn.ModuleList`` or ``nn.Sequential``):
  * the block list is the ``nn.ModuleList``/``nn.Sequential`` with the most children
    (first one on ties);
  * ``strided`` (the paper's default): block i → fragment i mod P;
    ``sequential``: contiguous runs of blocks, sizes differing by at most one
    (:func:`farsync.schedule.block_fragments`, which the simulator uses too);
  * parameters outside the blocks are placed by where they sit in
    ``model.named_parameters()``: those registered *before* the first block parameter
    (token embeddings) join the fragment holding block 0, and those *after* (final norm,
    output head) join the fragment holding the last block — inputs travel with the
    first layer, outputs with the last.
Explicit fragments (``fragment_groups``): a list of P entries, each a list of parameter-name patterns
(``fnmatch`` globs; a plain prefix such as ``"blocks.3"`` matches that module's
parameters) or of ``nn.Module`` objects.

Either way every trainable parameter must land in exactly one fragment; anything else
raises ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from farsync.schedule import FRAGMENT_PATTERNS, SettingError, block_fragments, check_choice

@dataclass
class Fragment:
    index: int
    names: list[str]
    params: list[nn.Parameter]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def find_blocks(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The model's block list: its ``nn.ModuleList`` (or ``nn.Sequential``) with the
    most children; the first one found on ties."""
    best: tuple[str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    return best


def build_fragments(
    model: nn.Module,
    fragments: int = 1,
    fragment_pattern: str = "strided",
    fragment_groups: list[list[str | nn.Module]] | None = None,
) -> list[Fragment]:
    """Assign every trainable parameter of ``model`` to exactly one of P fragments
    (``fragment_groups``, when given, lists them explicitly instead)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    if fragment_groups is not None:
        return _explicit(model, named, fragment_groups)
    if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
        raise SettingError("fragments", fragments, "must be an integer >= 1")
    check_choice("fragment_pattern", fragment_pattern, FRAGMENT_PATTERNS)
    if fragments == 1:
        return [Fragment(0, [n for n, _ in named], [p for _, p in named])]
    found = find_blocks(model)
    if found is None:
        raise SettingError(
            "fragments", fragments,
            "needs the model's blocks in an nn.ModuleList or nn.Sequential, and none was found; "
            "pass fragment_groups instead",
        )
    prefix, blocks = found
    n_blocks = len(blocks)
    if fragments > n_blocks:
        raise SettingError("fragments", fragments,
                           f"is more than the model's {n_blocks} blocks (in '{prefix}'); use P <= {n_blocks}")
    block_frag = block_fragments(n_blocks, fragments, fragment_pattern)

    def block_of(name: str) -> int | None:
        head = f"{prefix}." if prefix else ""
        if not name.startswith(head):
            return None
        idx = name[len(head):].split(".", 1)[0]
        return int(idx) if idx.isdigit() and int(idx) < n_blocks else None

    assign: list[int] = []
    seen_block = False
    for name, _ in named:
        b = block_of(name)
        if b is not None:
            seen_block = True
            assign.append(block_frag[b])
        else:
            # before the blocks: inputs (embeddings) → with block 0; after: outputs → last block
            assign.append(block_frag[-1] if seen_block else block_frag[0])
    frags = [Fragment(i, [], []) for i in range(fragments)]
    for (name, p), f in zip(named, assign):
        frags[f].names.append(name)
        frags[f].params.append(p)
    return frags


def _explicit(model, named, explicit) -> list[Fragment]:
    if len(explicit) < 1:
        raise ValueError("fragment_groups: need at least one fragment")
    module_names = {id(m): n for n, m in model.named_modules()}
    owner: dict[str, int] = {}
    for f, entries in enumerate(explicit):
        patterns: list[str] = []
        for e in entries:
            if isinstance(e, nn.Module):
                if id(e) not in module_names:
                    raise ValueError(f"fragment_groups[{f}]: module {type(e).__name__} is not part of the model")
                mname = module_names[id(e)]
                patterns += [f"{mname}.*" if mname else "*"]
            elif isinstance(e, str):
                patterns += [e, f"{e}.*"]
            else:
                raise ValueError(f"fragment_groups[{f}]: entries must be name patterns or modules (got {e!r})")
        for name, _ in named:
            if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                if name in owner and owner[name] != f:
                    raise ValueError(
                        f"parameter '{name}' is in two fragments ({owner[name]} and {f}); "
                        "each parameter must be in exactly one"
                    )
                owner[name] = f
    missing = [n for n, _ in named if n not in owner]
    if missing:
        raise ValueError(
            f"parameter '{missing[0]}' is in no fragment ({len(missing)} unassigned); "
            "each parameter must be in exactly one"
        )
    frags = [Fragment(i, [], []) for i in range(len(explicit))]
    for name, p in named:
        frags[owner[name]].names.append(name)
        frags[owner[name]].params.append(p)
    empty = [fr.index for fr in frags if not fr.params]
    if empty:
        raise ValueError(f"fragment_groups[{empty[0]}] matches no parameter")
    return frags


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a sharded (FSDP2) parameter's local shard,
    or ``t`` itself. Writing to it writes to the parameter."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or, when ``like`` (default ``t``) is a sharded
    parameter, ``t`` as this rank's shard of it gathered from every rank (a collective:
    every rank of the shard group calls it)."""
    from torch.distributed.tensor import DTensor

    like = t if like is None else like
    if not isinstance(like, DTensor):
        return t
    if not isinstance(t, DTensor):
        t = DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return t.full_tensor()


def flatten(tensors: list[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """Concatenate tensors (their local shards, for sharded ones) into one flat fp32 buffer,
    on ``device`` (default: where they are; each tensor is moved on its own, so nothing
    of the whole buffer is made where they are)."""
    return torch.cat([local(t).detach().reshape(-1).to(device=device, dtype=torch.float32) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy a flat buffer back into ``tensors`` (shapes and dtypes of the targets)."""
    offset = 0
    for t in tensors:
        t = local(t)
        n = t.numel()
        t.copy_(flat[offset: offset + n].view_as(t))
        offset += n
