"""Train-step throughput, MFU and memory: optax.adamw vs galore vs golore, one GPU.

    python -m benchmarks.train_step --models llama_60m,llama_350m --seq 256 \
        --json benchmarks/results/train_step.json

Each (model, optimizer) runs in its own process so that the peak device memory is its own.
A step is timed in two variants: the steady step (no refresh: ``update_every`` larger than the
run) and the refresh step (``update_every=1``: every step refreshes); the refresh cost amortized
over the GaLore paper's ``update_every=200`` is ``steady + (refresh - steady) / 200``.
Random tokens (the data pipeline is not what is measured). bf16 compute, fp32 master params.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks import report

MODELS = {  # hidden, intermediate, heads, layers, GaLore rank, batch at seq 256
    "llama_tiny": (256, 688, 4, 4, 64, 16),
    "llama_60m": (512, 1376, 8, 8, 128, 128),
    "llama_130m": (768, 2048, 12, 12, 256, 64),
    "llama_350m": (1024, 2736, 16, 24, 256, 32),
    "llama_1b": (2048, 5461, 32, 24, 512, 16),
    "llama_7b": (4096, 11008, 32, 32, 1024, 4),
}
OPTIMIZERS = ("adamw", "galore", "galore_gram", "golore")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def _optimizer(name: str, rank: int, update_every: int):
    import optax

    import golore_jax as gl

    lr = 1e-3
    if name == "adamw":
        return optax.adamw(lr, weight_decay=0.0)
    projector = {
        "galore": gl.projectors.svd(),
        "galore_gram": gl.projectors.gram_eigh(),
        "golore": gl.projectors.random(),
    }[name]
    return gl.galore_adamw(
        lr, rank=rank, update_every=update_every, scale=0.25, weight_decay=0.0, projector=projector
    )


def run_one(model_name: str, opt_name: str, seq: int, batch: int | None, steps: int) -> dict:
    """Measures one (model, optimizer) in this process."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    import golore_jax as gl
    from train import model as model_lib

    hidden, inter, heads, layers, rank, default_batch = MODELS[model_name]
    batch = batch or max(1, default_batch * 256 // seq)
    config = model_lib.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        num_layers=layers,
        max_seq_len=seq,
        dtype="bfloat16",
        param_dtype="float32",
        remat=model_name == "llama_7b",
    )
    model = model_lib.LlamaForCausalLM(config)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = jax.jit(lambda k: nn.unbox(model.init(k, inputs[:1])["params"]))(jax.random.key(0))
    result = {"model": model_name, "optimizer": opt_name, "seq": seq, "batch": batch}
    result["params"] = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def make_step(tx):
        def loss_fn(p):
            logits = model.apply({"params": p}, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        def step(p, s):
            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        return jax.jit(step, donate_argnums=(0, 1))

    def time_steps(tx, n):
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        step = make_step(tx)
        p, s, loss = step(p, s)  # compile + first step
        loss.block_until_ready()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            p, s, loss = step(p, s)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), s

    steady, state = time_steps(_optimizer(opt_name, rank, update_every=10**6), steps)
    result["state_floats"] = gl.optimizer_state_floats(state)
    result["state_bytes"] = sum(
        x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes")
    )
    result["steady_step_s"] = steady
    if opt_name != "adamw":
        refresh, _ = time_steps(_optimizer(opt_name, rank, update_every=1), max(3, steps // 4))
        result["refresh_step_s"] = refresh
        result["amortized_step_s"] = steady + (refresh - steady) / 200
    else:
        result["refresh_step_s"] = None
        result["amortized_step_s"] = steady
    tokens_per_step = batch * seq
    result["steady_tokens_per_s"] = tokens_per_step / steady
    result["amortized_tokens_per_s"] = tokens_per_step / result["amortized_step_s"]
    flops = model_lib.model_flops_per_token(config, seq) * tokens_per_step
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
    result["device"] = kind
    result["mfu_steady"] = flops / steady / peak if peak else None
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_bytes"] = stats.get("peak_bytes_in_use")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="llama_60m")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.seq, args.batch, args.steps)))
        return
    rows = []
    for model_name in args.models.split(","):
        for opt_name in args.optimizers.split(","):
            cmd = [sys.executable, "-m", "benchmarks.train_step", "--one", model_name, opt_name]
            cmd += ["--seq", str(args.seq), "--steps", str(args.steps)]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{model_name} {opt_name} failed:\n{out.stderr[-3000:]}", flush=True)
                continue
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        "| model | optimizer | seq x batch | state MiB | peak GiB | steady tok/s | refresh step s"
        " | amortized tok/s (tau=200) | vs adamw | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {r["model"]: r["amortized_tokens_per_s"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        ratio = r["amortized_tokens_per_s"] / base[r["model"]] if r["model"] in base else None
        refresh = f"{r['refresh_step_s']:.3f}" if r["refresh_step_s"] else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "-"
        mfu = f"{r['mfu_steady']:.1%}" if r["mfu_steady"] else "-"
        vs = f"{ratio:.3f}" if ratio else "-"
        print(
            f"| {r['model']} | {r['optimizer']} | {r['seq']}x{r['batch']} | "
            f"{r['state_bytes'] / 2**20:.0f} | {peak} | {r['steady_tokens_per_s']:,.0f} | "
            f"{refresh} | {r['amortized_tokens_per_s']:,.0f} | {vs} | {mfu} |"
        )
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
