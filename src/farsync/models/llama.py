"""A Llama/Chinchilla-style decoder-only transformer in one readable file.

Pre-norm blocks of causal self-attention and a SwiGLU MLP, with RMSNorm, rotary position
embeddings (RoPE), QK-norm (RMSNorm on each head's queries and keys) and an optional
z-loss. This is the model family of the DiLoCo and Streaming DiLoCo papers
(arXiv 2311.08105, 2501.18512), which follow Chinchilla (arXiv 2203.15556).

The file is pure PyTorch: it imports nothing else from farsync and knows nothing of
distribution. What the training algorithms rely on is only the module layout:

    tok_emb -> blocks[0] ... blocks[n_layers-1] -> norm -> head

with the transformer blocks held in ``self.blocks`` (an ``nn.ModuleList``), so that
Streaming DiLoCo can cut the model into fragments of consecutive or strided blocks.

Shape letters: B batch, T sequence length, C model width (dim), nh heads, hs head size
(C // nh), V vocabulary size, F MLP hidden width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    """Architecture of a :class:`Llama` model. Error messages name fields as ``model.<field>``."""

    vocab_size: int
    """Number of token ids the embedding and the output head cover."""
    dim: int
    """Model width C (residual stream size)."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads per block; head size is dim // n_heads and must be even (RoPE)."""
    max_seq_len: int
    """Longest sequence the model accepts; the RoPE tables are precomputed to this length."""
    ffn_mult: float = 8 / 3
    """MLP hidden width as a multiple of dim. 8/3 keeps a SwiGLU MLP (three matrices) at the
    parameter count of a classic 4x MLP (two matrices)."""
    ffn_hidden: int | None = None
    """Exact MLP hidden width; overrides ffn_mult and multiple_of when set."""
    multiple_of: int = 64
    """Round the MLP hidden width up to a multiple of this (friendlier matmul shapes)."""
    norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base: frequencies are rope_theta ** (-2i / hs)."""
    qk_norm: bool = True
    """RMSNorm on queries and keys per head before RoPE: keeps attention logits bounded,
    which stabilises training at the high learning rates low-communication methods like."""
    z_loss: float = 0.0
    """Coefficient of the z-loss, z_loss * mean(logsumexp(logits) ** 2), added to the
    cross-entropy; pulls the softmax normaliser towards 1 (PaLM, arXiv 2204.02311). 0 disables."""
    tie_embeddings: bool = False
    """Share one matrix between the token embedding and the output head."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer (got {value!r})")
        if self.dim % self.n_heads != 0:
            raise ValueError(
                f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head size model.dim / model.n_heads = {self.head_dim} must be even for RoPE; "
                f"change model.dim ({self.dim}) or model.n_heads ({self.n_heads})"
            )
        if self.ffn_hidden is not None and (
            not isinstance(self.ffn_hidden, int) or self.ffn_hidden < 1
        ):
            raise ValueError(f"model.ffn_hidden must be a positive integer (got {self.ffn_hidden!r})")
        if not self.ffn_mult > 0:
            raise ValueError(f"model.ffn_mult must be > 0 (got {self.ffn_mult!r})")
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0 (got {self.norm_eps!r})")
        if not self.rope_theta > 0:
            raise ValueError(f"model.rope_theta must be > 0 (got {self.rope_theta!r})")
        if not self.z_loss >= 0:
            raise ValueError(f"model.z_loss must be >= 0 (got {self.z_loss!r}); 0 disables it")
        if not self.init_std > 0:
            raise ValueError(f"model.init_std must be > 0 (got {self.init_std!r})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width F."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(self.ffn_mult * self.dim)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# The size ladder. The four named after parameter counts follow the Streaming DiLoCo
# paper's architecture table (dim = 64 * heads). Their names count the transformer blocks
# plus one vocabulary matrix, as the papers do; the default untied head adds a second.
# Counts at a 32,000-token vocabulary (MLP width F from ffn_mult = 8/3, multiple_of = 64):
#
#   size    dim  layers  heads     F   non-embedding   tied total   untied total
#   nano     32     4       2     128        65,952      1,089,952      2,113,952
#   micro    48     4       2     128       111,216      1,647,216      3,183,216
#   tiny    128     4       4     384       853,376      4,949,376      9,045,376
#   mini    256     6       4     704     4,820,992     13,012,992     21,204,992
#   small   384     6       6    1024    10,622,592     22,910,592     35,198,592
#   35m     512     6       8    1408    19,275,008     35,659,008     52,043,008
#   100m    768     9      12    2048    63,716,736     88,292,736    112,868,736
#   200m   1024    12      16    2752   151,808,512    184,576,512    217,344,512
#   1b     2048    24      32    5504 1,214,354,432  1,279,890,432  1,345,426,432
MODEL_SIZES: dict[str, dict] = {
    # Unit tests: several blocks (for fragment tests) at almost no compute.
    "nano": dict(dim=32, n_layers=4, n_heads=2),
    # The quality benchmark: 160k parameters at a 512-token vocabulary, so 20 tokens per
    # parameter (3.2M tokens, over 50 outer rounds) fit a 2-core CPU run of about 2 min.
    "micro": dict(dim=48, n_layers=4, n_heads=2),
    # The CPU demo. Measured on 2 cores, vocab 4096, batch 16 x seq 128: about 140 ms per
    # fwd+bwd, over a third of it in the vocabulary-sized head and softmax (the step takes
    # about 65 ms at batch 8 or at seq 64).
    "tiny": dict(dim=128, n_layers=4, n_heads=4),
    # CPU benchmarks: slower, but big enough for differences between methods to show.
    "mini": dict(dim=256, n_layers=6, n_heads=4),
    "small": dict(dim=384, n_layers=6, n_heads=6),
    # The papers' ladder.
    "35m": dict(dim=512, n_layers=6, n_heads=8),
    "100m": dict(dim=768, n_layers=9, n_heads=12),
    "200m": dict(dim=1024, n_layers=12, n_heads=16),
    "1b": dict(dim=2048, n_layers=24, n_heads=32),
}


def model_config(size: str, vocab_size: int, max_seq_len: int, **overrides) -> LlamaConfig:
    """Config for a named size from :data:`MODEL_SIZES`; ``overrides`` replace any field."""
    if size not in MODEL_SIZES:
        raise ValueError(
            f"model.size must be one of {', '.join(MODEL_SIZES)} (got {size!r})"
        )
    known = {f.name for f in fields(LlamaConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    kwargs = dict(MODEL_SIZES[size], vocab_size=vocab_size, max_seq_len=max_seq_len)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, over the last dimension. No mean subtraction and no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under bf16 autocast: the mean of squares loses precision
        # in low precision, and this is cheap next to the matmuls.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (max_seq_len, head_dim // 2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    # Angles in fp64 then cast: position * frequency loses digits in fp32 at long lengths.
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of every head by position-dependent angles.

    x is (B, nh, T, hs); cos and sin are (T, hs/2). Rotating q and k by angles linear in
    position makes q·k depend on positions only through their difference.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        # One matmul for q, k and v: fewer, larger kernels are faster, notably on CPU.
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)  # output projection into the residual
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.wqkv(x).split(C, dim=-1)  # (B, T, C) each
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        # QK-norm before RoPE, so the rotation acts on unit-scale vectors.
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.wo(y)


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer, arXiv 2002.05202)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        hidden = cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)  # down: output projection into the residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (B, T, F) inside, (B, T, C) out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)  # (B, T, C)
        x = x + self.mlp(self.mlp_norm(x))  # (B, T, C)
        return x


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One Parameter in two places: model.parameters() yields it once, so optimizers
            # and pseudo-gradient exchange see it once.
            self.head.weight = self.tok_emb.weight

        # Non-persistent buffers: derived from the config, so they stay out of the
        # state_dict (checkpoints) and out of parameters() (never communicated).
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (max_seq_len, hs/2)

        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise all weights; deterministic given torch's global seed.

        Every matrix is drawn from N(0, init_std²) and norm gains start at 1. The two
        projections that write into the residual stream (attention wo, MLP w2) use
        init_std / sqrt(2 * n_layers): the residual stream is a sum of 2 * n_layers such
        outputs, so this keeps its variance at init roughly independent of depth
        (GPT-2, nanoGPT).
        """
        std = self.cfg.init_std
        # modules() walks in registration order, so the random draws come in a fixed order.
        # A tied matrix is drawn twice (as embedding, then as head): wasteful but harmless,
        # and it keeps the draw sequence, hence every block's weights, the same as untied.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.w2.weight, mean=0.0, std=residual_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) for token ids idx (B, T); with targets (B, T) also the loss.

        The loss is the mean next-token cross-entropy over all B*T positions, plus
        z_loss * mean(logsumexp(logits)²) when the config's z_loss > 0.
        """
        B, T = idx.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len ({self.cfg.max_seq_len})"
            )
        x = self.tok_emb(idx)  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs/2)
        for block in self.blocks:
            x = block(x, cos, sin)  # (B, T, C)
        x = self.norm(x)
        logits = self.head(x)  # (B, T, V)

        loss = None
        if targets is not None:
            # Loss in fp32: softmax over a large vocabulary in bf16 is visibly inaccurate.
            flat = logits.float().view(B * T, -1)  # (B*T, V)
            loss = F.cross_entropy(flat, targets.reshape(B * T))
            if self.cfg.z_loss > 0:
                lse = torch.logsumexp(flat, dim=-1)  # (B*T,)
                loss = loss + self.cfg.z_loss * lse.pow(2).mean()
        return logits, loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters, each shared tensor counted once.

        With ``non_embedding=True`` the vocabulary matrices (token embedding and, when
        untied, the output head) are left out: what remains is the count that scaling
        laws use (Kaplan et al., arXiv 2001.08361).
        """
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                total -= self.head.weight.numel()
        return total

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.cfg).items())
