"""Optimizer-state size of galore/golore vs optax.adamw for LLaMA shapes (closed form, no GPU).

    python -m benchmarks.state_memory [--json benchmarks/results/state_memory.json]

Counts are checked against a real ``init`` (run under ``jax.eval_shape``, so nothing is
allocated): the closed form of :func:`golore_jax.subspace_state_floats` must equal the floats in
the state that ``galore_adamw(...).init`` builds.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import golore_jax as gl
from benchmarks import report
from configs.models import MODELS, ModelShape

# GaLore's configs/llama_*.json with the GaLore paper's ranks (configs/models.py).
SHAPES = {
    name: MODELS[name] for name in ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
}


def llama_param_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict:
    """A LLaMA param tree of ShapeDtypeStructs in Flax (in, out) layout."""

    def s(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    layer = {
        "self_attn": {n: {"kernel": s(hidden, hidden)} for n in ("q_proj", "k_proj", "v_proj")}
        | {"o_proj": {"kernel": s(hidden, hidden)}},
        "mlp": {
            "gate_proj": {"kernel": s(hidden, inter)},
            "up_proj": {"kernel": s(hidden, inter)},
            "down_proj": {"kernel": s(inter, hidden)},
        },
        "input_layernorm": {"scale": s(hidden)},
        "post_attention_layernorm": {"scale": s(hidden)},
    }
    return {
        "embed_tokens": {"embedding": s(vocab, hidden)},
        **{f"layers_{i}": layer for i in range(layers)},
        "norm": {"scale": s(hidden)},
        "lm_head": {"kernel": s(hidden, vocab)},
    }


def model_param_shapes(shape: ModelShape, layers: int | None = None) -> dict:
    """:func:`llama_param_shapes` of a ``configs.models`` shape (``layers``: fewer of them)."""
    layers = shape.layers if layers is None else layers
    return llama_param_shapes(shape.hidden, shape.intermediate, layers, shape.vocab)


def measure(name: str) -> dict:
    shape = SHAPES[name]
    rank = shape.rank
    params = model_param_shapes(shape)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    adamw = gl.optimizer_state_floats(jax.eval_shape(optax.adamw(1e-3).init, params))
    galore = gl.optimizer_state_floats(
        jax.eval_shape(gl.galore_adamw(1e-3, subspace=gl.Subspace(rank=rank)).init, params)
    )
    closed = gl.subspace_state_floats(params, rank=rank)
    if closed != galore:
        raise AssertionError(f"{name}: closed form {closed} != measured {galore}")
    return {
        "model": name,
        "params": n_params,
        "rank": rank,
        "adamw_state_floats": adamw,
        "galore_state_floats": galore,
        "ratio": galore / adamw,
        "saving_gib_fp32": (adamw - galore) * 4 / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [measure(name) for name in SHAPES]
    print("| model | params | rank | adamw state | galore/golore state | ratio | saved (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['rank']} | "
            f"{r['adamw_state_floats'] / 1e6:.1f}M | {r['galore_state_floats'] / 1e6:.1f}M | "
            f"{r['ratio']:.3f} | {r['saving_gib_fp32']:.2f} GiB |"
        )
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
