"""Hugging Face causal LMs: wrapped unchanged by DiLoCo (fragments from their decoder
layers) and trained by `farsync train --model.hf_config=` from a config.json the test
writes (random weights; nothing is downloaded). Needs the `hf` extra (in `dev`)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from farsync.algorithms import make_strategy, step_in_lockstep  # noqa: E402
from farsync.comm import InProcessGroup  # noqa: E402
from farsync.train.config import ConfigError, build_config  # noqa: E402
from farsync.train import train  # noqa: E402

CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000, "max_position_embeddings": 128},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 128},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 4, "n_head": 2, "vocab_size": 1000, "n_positions": 128},
}
LAYERS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}


def write_config(tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps(CONFIGS[kind]))
    return str(path)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_diloco_wraps_a_transformers_model_unchanged(kind):
    config = transformers.AutoConfig.for_model(**CONFIGS[kind])
    group = InProcessGroup(2)
    models, algos = [], []
    for r in range(2):
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(config)
        models.append(m)
        algos.append(make_strategy(m, torch.optim.AdamW(m.parameters(), lr=1e-3), group.communicator(r),
                                   mode="streaming", inner_steps=4, fragments=2, codec="fp4-e3m0"))
    layers = LAYERS[kind]
    frags = algos[0].fragments
    owner = {n: i for i, f in enumerate(frags) for n in f.names}
    assert [owner[f"{layers}.{b}.{next(iter(dict(models[0].get_submodule(f'{layers}.{b}').named_parameters())))}"]
            for b in range(4)] == [0, 1, 0, 1]  # strided over the decoder layers
    for step in range(8):
        for r, m in enumerate(models):
            g = torch.Generator().manual_seed(100 * r + step)
            x = torch.randint(0, 1000, (2, 16), generator=g)
            m(input_ids=x, labels=x).loss.backward()
        step_in_lockstep(algos)
        for a in algos:
            a.inner_optimizer.zero_grad()
    assert algos[0].stats.sync_events == 3  # fragment 0 at 4, 8; fragment 1 at 6
    f0 = [n for n in frags[0].names]
    p0 = dict(models[0].named_parameters())
    p1 = dict(models[1].named_parameters())
    assert all(torch.equal(p0[n], p1[n]) for n in f0)  # just synced (α = 0): replicas agree


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_farsync_train_trains_a_transformers_architecture(tmp_path, kind):
    from test_train_cli import _run

    s = train(_run(tmp_path, kind, steps=24, **{"model.hf_config": write_config(tmp_path, kind)}))
    assert s["model"].startswith({"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[kind])
    rows = [json.loads(x) for x in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if r["kind"] == "eval"]
    assert evals[-1] < evals[0] and s["dp_bytes_ratio"] > 2


def test_hf_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="model.hf_config: no such file or directory"):
        build_config(None, [f"--model.hf_config={tmp_path / 'none.json'}"])
    short = tmp_path / "short.json"
    short.write_text(json.dumps({**CONFIGS["llama"], "max_position_embeddings": 16}))
    from farsync.models.hf import load_hf_config

    with pytest.raises(ValueError, match="allows 16 positions, fewer than model.seq_len = 64"):
        load_hf_config(str(short), 512, 64)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match="is not a transformers config"):
        load_hf_config(str(bad), 512, 64)


@pytest.mark.parametrize("extra", [
    {},  # farsync's Llama with QK-norm: exported as Qwen3
    {"model.qk_norm": "false", "algo.mode": "dp"},  # without: as Llama; data-parallel's θ is the model
    {"model.hf_config": "llama"},  # a transformers architecture: as itself
])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, extra):
    from test_train_cli import _run, cli

    from farsync.data import Corpus
    from farsync.train.export import global_parameters
    from farsync.train.components import build_model

    if "model.hf_config" in extra:
        extra = {**extra, "model.hf_config": write_config(tmp_path, extra["model.hf_config"])}
    train(_run(tmp_path, "run", steps=12, **extra))
    out = tmp_path / "hf"
    r = cli("export", str(tmp_path / "run"), str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()

    cfg, params, step = global_parameters(str(tmp_path / "run"))
    assert step == 12
    corpus = Corpus.build(cfg.data, log=lambda m: None)
    ours = build_model(cfg, corpus.vocab_size, torch.device("cpu"))
    ours.load_state_dict(params, strict=False)
    for name, p in ours.named_parameters():  # θ_g, every parameter
        assert torch.equal(p, params[name].to(p.dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    x, _ = corpus.eval_batches(2, 64, 1)[0]
    with torch.no_grad():
        want = ours.eval()(x)[0]
        got = hf(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def add(a, b):\n    return a + b\n"
    assert tok(text)["input_ids"] == corpus.encode(text)


def test_export_errors_are_one_line(tmp_path):
    from test_train_cli import cli

    r = cli("export", str(tmp_path), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {str(tmp_path)!r} has no config.toml (not a farsync run directory)"
