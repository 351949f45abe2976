"""The Llama model: shapes, causality, initial loss, z-loss, RoPE, init, parameter ladder."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from farsync.models import MODEL_SIZES, Llama, LlamaConfig, model_config
from farsync.models import llama as llama_module
from farsync.models.llama import apply_rope, rope_tables

V, T = 97, 16


def make(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    return Llama(model_config("nano", vocab_size=V, max_seq_len=T, **overrides))


def batch(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return x, y


def test_shapes_and_loss_optional():
    m = make()
    x, y = batch()
    logits, loss = m(x)
    assert logits.shape == (3, T, V) and loss is None
    logits, loss = m(x, y)
    assert loss.shape == () and torch.isfinite(loss)
    # Shorter sequences than max_seq_len work; longer ones are refused with the limit named.
    assert m(x[:, :5])[0].shape == (3, 5, V)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, T + 1, dtype=torch.long))


def test_causal():
    m = make()
    x, _ = batch()
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % V
    a, _ = m(x)
    b, _ = m(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_initial_loss_is_uniform_guess():
    torch.manual_seed(0)
    m = Llama(model_config("tiny", vocab_size=4096, max_seq_len=64))
    x = torch.randint(0, 4096, (4, 64))
    y = torch.randint(0, 4096, (4, 64))
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(4096)) < 0.05


def test_z_loss_adds_coefficient_times_mean_squared_logsumexp():
    x, y = batch()
    plain = make(seed=5)
    with_z = make(seed=5, z_loss=1e-2)
    logits, base = plain(x, y)
    logits_z, total = with_z(x, y)
    torch.testing.assert_close(logits, logits_z)
    # Make the normaliser far from 1 so the z term is visibly non-zero.
    with torch.no_grad():
        for m in (plain, with_z):
            m.head.weight.mul_(50)
    logits, base = plain(x, y)
    _, total = with_z(x, y)
    expected = 1e-2 * torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
    assert expected.item() > 1e-3
    torch.testing.assert_close(total - base, expected, rtol=1e-4, atol=1e-6)


def test_layout_the_algorithms_rely_on():
    m = make()
    assert isinstance(m.blocks, nn.ModuleList) and len(m.blocks) == 4
    assert isinstance(m.tok_emb, nn.Embedding) and isinstance(m.head, nn.Linear)
    assert m.head.weight is not m.tok_emb.weight  # untied by default
    names = [n for n, _ in m.named_parameters()]
    assert names[0] == "tok_emb.weight" and names[-1] == "head.weight"
    assert all(n.startswith(("tok_emb.", "blocks.", "norm.", "head.")) for n in names)
    # RoPE tables are derived buffers: not parameters, not in the checkpoint.
    assert not any("rope" in k for k in m.state_dict())


def test_tied_embeddings_share_one_parameter():
    tied, untied = make(tie_embeddings=True), make()
    assert tied.head.weight is tied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == V * 32
    assert tied.num_parameters(non_embedding=True) == untied.num_parameters(non_embedding=True)
    # Same draws in the same order: everything but the head agrees.
    for (n, a), (_, b) in zip(tied.blocks.named_parameters(), untied.blocks.named_parameters()):
        assert torch.equal(a, b), n


def test_deterministic_init():
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.blocks[0].attn.wqkv.weight, c.blocks[0].attn.wqkv.weight)


def test_residual_projections_scaled_down_at_init():
    torch.manual_seed(0)
    cfg = model_config("mini", vocab_size=512, max_seq_len=32)
    m = Llama(cfg)
    std_in = m.blocks[0].attn.wqkv.weight.std().item()
    std_out = torch.cat([torch.cat([b.attn.wo.weight.flatten(), b.mlp.w2.weight.flatten()])
                         for b in m.blocks]).std().item()
    assert abs(std_in - 0.02) < 0.001
    assert abs(std_out - 0.02 / math.sqrt(2 * cfg.n_layers)) < 0.0005
    assert torch.equal(m.norm.weight, torch.ones(cfg.dim))


def test_rope_depends_on_relative_position_only():
    hs, L = 16, 40
    cos, sin = rope_tables(hs, L, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(hs, generator=g), torch.randn(hs, generator=g)
    # Same vector at every position: (1, 1, L, hs)
    qs = apply_rope(q.expand(1, 1, L, hs), cos, sin)[0, 0]
    ks = apply_rope(k.expand(1, 1, L, hs), cos, sin)[0, 0]
    scores = qs @ ks.T  # (L, L): score[i, j] for query at i, key at j
    for offset in (0, 3, 17):
        diag = torch.diagonal(scores, offset=-offset)  # all pairs with i - j = offset
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=1e-4, atol=1e-4)
    # Position 0 is the identity, and rotation preserves norms.
    torch.testing.assert_close(qs[0], q)
    torch.testing.assert_close(qs.norm(dim=-1), q.norm().expand(L))


def test_rope_hand_check():
    # hs = 2: one pair rotated by angle = position (theta ** 0 = 1).
    cos, sin = rope_tables(2, 3, 10000.0)
    x = torch.tensor([1.0, 0.0]).expand(1, 1, 3, 2)
    out = apply_rope(x, cos, sin)[0, 0]
    expected = torch.tensor([[math.cos(p), math.sin(p)] for p in range(3)])
    torch.testing.assert_close(out, expected)


def test_qk_norm_toggle():
    m = make(qk_norm=False)
    assert isinstance(m.blocks[0].attn.q_norm, nn.Identity)
    assert make().num_parameters() - m.num_parameters() == 4 * 2 * 16  # 2 norms of hs=16 per block


def test_adamw_overfits_a_repeated_batch():
    m = make()
    x, y = batch(B=4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss = m(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def _expected_params(cfg: LlamaConfig) -> int:
    C, F, hs, L = cfg.dim, cfg.hidden_dim, cfg.head_dim, cfg.n_layers
    per_block = 4 * C * C + 3 * C * F + 2 * C + 2 * hs  # attn, mlp, two norms, qk-norms
    return cfg.vocab_size * C * (1 if cfg.tie_embeddings else 2) + L * per_block + C


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_parameter_count_formula(size):
    cfg = model_config(size, vocab_size=32000, max_seq_len=2048)
    with torch.device("meta"):  # no memory, no init cost: even 1b is instant
        m = Llama(cfg)
    assert m.num_parameters() == _expected_params(cfg)
    assert m.num_parameters(non_embedding=True) == _expected_params(cfg) - 2 * 32000 * cfg.dim


# Nominal sizes count the blocks plus one 32k-vocabulary matrix (as the papers do):
# within 30 % of the name. Exact figures are in the model docs.
@pytest.mark.parametrize("size,nominal", [("35m", 35e6), ("100m", 100e6), ("200m", 200e6), ("1b", 1e9)])
def test_ladder_counts_near_their_names(size, nominal):
    cfg = model_config(size, vocab_size=32000, max_seq_len=2048, tie_embeddings=True)
    with torch.device("meta"):
        m = Llama(cfg)
    assert 0.7 < m.num_parameters() / nominal < 1.3
    assert cfg.dim == 64 * cfg.n_heads  # the paper's head size


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"model\.dim \(100\) must be divisible by model\.n_heads \(3\)"):
        LlamaConfig(vocab_size=10, dim=100, n_layers=1, n_heads=3, max_seq_len=8)
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(vocab_size=10, dim=12, n_layers=1, n_heads=4, max_seq_len=8)
    with pytest.raises(ValueError, match=r"model\.n_layers must be a positive integer \(got 0\)"):
        LlamaConfig(vocab_size=10, dim=16, n_layers=0, n_heads=2, max_seq_len=8)
    with pytest.raises(ValueError, match=r"model\.z_loss must be >= 0 \(got -1"):
        LlamaConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, max_seq_len=8, z_loss=-1.0)


def test_model_config_unknown_size_lists_valid_names():
    with pytest.raises(ValueError) as e:
        model_config("huge", 100, 16)
    assert "'huge'" in str(e.value) and all(name in str(e.value) for name in MODEL_SIZES)
    with pytest.raises(ValueError, match="unknown model option.*n_layer"):
        model_config("tiny", 100, 16, n_layer=3)
    assert model_config("tiny", 100, 16, n_layers=2).n_layers == 2


def test_ffn_hidden_rounding_and_override():
    assert model_config("tiny", 100, 16).hidden_dim == 384  # 8/3 * 128 = 341.3 -> 384
    assert model_config("tiny", 100, 16, ffn_hidden=100).hidden_dim == 100


def test_model_file_is_standalone():
    tree = ast.parse(Path(llama_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not any(i.startswith(("farsync", "torch.distributed")) for i in imported), imported


def test_ladder_table_in_the_source_is_current():
    rows = [line.split() for line in Path(llama_module.__file__).read_text().splitlines()
            if line.startswith("#   ") and line.split()[1] in MODEL_SIZES]
    assert [r[1] for r in rows] == list(MODEL_SIZES)
    for _, name, dim, layers, heads, hidden, non_emb, tied, untied in rows:
        with torch.device("meta"):
            a = Llama(model_config(name, 32000, 64))
            b = Llama(model_config(name, 32000, 64, tie_embeddings=True))
        c = a.cfg
        assert [int(dim), int(layers), int(heads), int(hidden)] == [c.dim, c.n_layers, c.n_heads, c.hidden_dim]
        assert int(non_emb.replace(",", "")) == a.num_parameters(non_embedding=True)
        assert int(tied.replace(",", "")) == b.num_parameters()
        assert int(untied.replace(",", "")) == a.num_parameters()
