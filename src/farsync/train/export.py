"""A finished run's global model θ_g as a Hugging Face folder: ``config.json`` and
``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads, the
run's tokenizer beside them (``AutoTokenizer.from_pretrained(OUT_DIR)``).

farsync's Llama maps onto a ``transformers`` architecture weight for weight: with QK-norm
(the default) onto Qwen3 (per-head RMSNorm on queries and keys before RoPE, the same
rotate-half RoPE, SwiGLU, RMSNorm, no biases), without it onto Llama. The fused q/k/v
matrix is cut into ``q_proj``, ``k_proj``, ``v_proj``. A run trained with
``model.hf_config`` is saved as the architecture it is. Needs ``pip install 'farsync[hf]'``.
"""

from __future__ import annotations

import json
import os

import torch

from farsync.train import checkpoint as ckpt
from farsync.train.config import Config, build_config
from farsync.train.rundir import read_recipe


def _exported_worker(run_dir: str) -> int:
    """Whose θ_g is exported: worker 0's (every worker holds the same θ_g), or in an
    elastic worker's run directory (RUN/worker-K) worker K's, its only file."""
    base = os.path.basename(os.path.normpath(run_dir))
    return int(base[7:]) if base.startswith("worker-") and base[7:].isdigit() else 0


def global_parameters(run_dir: str, log=None) -> tuple[Config, dict[str, torch.Tensor], int]:
    """The run's resolved config, θ_g by parameter name (from its newest usable
    checkpoint: a damaged newer one is named to ``log`` and passed over) and the step it
    holds. The checkpoint is read as tensors and plain data only: nothing in it runs."""
    if not os.path.isfile(os.path.join(run_dir, "config.toml")):
        raise ValueError(f"{run_dir!r} has no config.toml (not a farsync run directory)")
    cfg = build_config(read_recipe(os.path.join(run_dir, "config.toml")))
    worker = _exported_worker(run_dir)
    files = _site_files(run_dir, worker)
    step = ckpt.resume_step(run_dir, files, log=log)
    if step is None:
        raise ValueError(f"{run_dir!r} has no complete checkpoint to export")
    states = [ckpt.load_worker(run_dir, step, f, map_location="cpu") for f in files]
    # a site's ranks: DDP holds the whole model on each, FSDP2 each rank's row chunk of every parameter
    join = (lambda ts: torch.cat(ts)) if len(states) > 1 and cfg.site.parallel == "fsdp" else (lambda ts: ts[0])
    params = {k: join([s["model"][k] for s in states]) for k in states[0]["model"]}
    algo = states[0]["algo"]
    if "anchors" in algo:  # DiLoCo: θ_g is the anchors, fragment by fragment
        for i, names in enumerate(algo["fragment_names"]):
            for j, n in enumerate(names):
                params[n] = join([s["algo"]["anchors"][i][j] for s in states]).float()
    return cfg, params, step


def _site_files(run_dir: str, worker: int) -> list:
    """The checkpoint files that hold ``worker``'s state: its own, or, for a worker that was
    a site of R ranks, one per rank ("W.rR", rank order)."""
    step_dirs = [d for d in os.listdir(os.path.join(run_dir, "checkpoints"))] if os.path.isdir(
        os.path.join(run_dir, "checkpoints")) else []
    for d in sorted(step_dirs, reverse=True):
        names = os.listdir(os.path.join(run_dir, "checkpoints", d)) if d.startswith("step-") else []
        ranks = sorted(int(n[len(f"worker-{worker}.r"):-3]) for n in names
                       if n.startswith(f"worker-{worker}.r") and n.endswith(".pt") and n[len(f"worker-{worker}.r"):-3].isdigit())
        if ranks:
            return [f"{worker}.r{r}" for r in ranks]
    return [worker]


def _llama_to_hf(cfg: Config, params: dict[str, torch.Tensor]):
    """(transformers config, state dict) for farsync's Llama."""
    import transformers

    from farsync.models import model_config

    vocab = params["tok_emb.weight"].shape[0]
    m = model_config(cfg.model.size, vocab, cfg.model.seq_len, z_loss=cfg.model.z_loss, qk_norm=cfg.model.qk_norm)
    common = dict(vocab_size=vocab, hidden_size=m.dim, intermediate_size=m.hidden_dim, num_hidden_layers=m.n_layers,
                  num_attention_heads=m.n_heads, num_key_value_heads=m.n_heads, head_dim=m.head_dim,
                  max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                  tie_word_embeddings=m.tie_embeddings, hidden_act="silu", attention_bias=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_cfg = (transformers.Qwen3Config(**common, use_sliding_window=False) if m.qk_norm
              else transformers.LlamaConfig(**common, mlp_bias=False))
    out = {"model.embed_tokens.weight": params["tok_emb.weight"], "model.norm.weight": params["norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["head.weight"]
    for i in range(m.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = params[b + "attn.wqkv.weight"].split(m.dim, dim=0)
        out.update({
            h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
            h + "self_attn.o_proj.weight": params[b + "attn.wo.weight"],
            h + "input_layernorm.weight": params[b + "attn_norm.weight"],
            h + "post_attention_layernorm.weight": params[b + "mlp_norm.weight"],
            h + "mlp.gate_proj.weight": params[b + "mlp.w1.weight"],
            h + "mlp.up_proj.weight": params[b + "mlp.w3.weight"],
            h + "mlp.down_proj.weight": params[b + "mlp.w2.weight"],
        })
        if m.qk_norm:
            out[h + "self_attn.q_norm.weight"] = params[b + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = params[b + "attn.k_norm.weight"]
    return hf_cfg, out


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """``out_dir`` is a folder to create, or an empty one (``overwrite``: one whose files
    may be replaced); ValueError naming it otherwise."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export: {out_dir!r} is a file, not a folder: give a folder to write the model into")
    if not overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"export: {out_dir!r} is not empty: give a new or empty folder, or pass --overwrite to "
                         "write over the files there")


def export(run_dir: str, out_dir: str, *, overwrite: bool = False, log=None) -> str:
    """Write the run's θ_g (and tokenizer) to ``out_dir`` as a Hugging Face folder;
    returns a one-line description. ``out_dir`` must be new or empty unless
    ``overwrite``."""
    check_out_dir(out_dir, overwrite)
    try:
        import transformers
    except ImportError:
        raise ValueError("farsync export needs the transformers package: pip install 'farsync[hf]'") from None
    cfg, params, step = global_parameters(run_dir, log=log)
    if cfg.model.hf_config:
        from farsync.models.hf import load_hf_config

        vocab = next(v.shape[0] for n, v in params.items() if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
        hf_cfg = load_hf_config(cfg.model.hf_config, vocab, cfg.model.seq_len)
        state = {n.removeprefix("hf."): v for n, v in params.items()}
    else:
        hf_cfg, state = _llama_to_hf(cfg, params)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(hf_cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"export: weights do not match {type(model).__name__}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    _save_tokenizer(cfg, out_dir)
    return f"step {step} of {run_dir}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters -> {out_dir}"


def _save_tokenizer(cfg: Config, out_dir: str) -> None:
    """The run's tokenizer as tokenizer.json + tokenizer_config.json (text sources)."""
    from farsync.data import Corpus
    from farsync.data.config import is_pretokenized
    from farsync.data.tokenizer import EOS_TOKEN

    if is_pretokenized(cfg.data.source):
        return  # ids came without a tokenizer
    corpus = Corpus.build(cfg.data, log=lambda m: None)  # cached: reads the tokenizer back
    corpus.tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
                   "model_max_length": cfg.model.seq_len}, f, indent=2)
