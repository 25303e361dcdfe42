"""A small random Hugging Face LLaMA, built one way for the checkpoint and fine-tune tests."""

from __future__ import annotations

from typing import Any


def tiny_hf_llama(
    transformers: Any, torch: Any, seed: int = 0, perturb: float = 0.1, **overrides: Any
) -> Any:
    """A random ``transformers.LlamaForCausalLM`` (fp32, eager attention, GQA, untied), in eval
    mode; nothing is downloaded. ``perturb`` is the std of noise added to every parameter so the
    norms are not all ones and the logits are not tiny (0: transformers' own init);
    ``overrides`` replace LlamaConfig fields. The callers import torch and transformers (with
    ``pytest.importorskip``) so that a test without them is skipped, not failed."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**kw, **overrides})).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model
