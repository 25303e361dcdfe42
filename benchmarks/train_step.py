"""Train-step throughput, MFU and memory: optax.adamw vs galore vs golore, one GPU.

    python -m benchmarks.train_step --models llama_60m,llama_350m --seq 256 \
        --json benchmarks/results/train_step.json

Each (model, optimizer) runs in its own process so that the peak device memory is its own.
A step is timed in two variants: the steady step (no refresh: ``update_every`` larger than the
run) and the refresh step (``update_every=1``: every step refreshes); the refresh cost amortized
over the GaLore paper's ``update_every=200`` is ``steady + (refresh - steady) / 200``.
Random tokens (the data pipeline is not what is measured). bf16 compute, fp32 master params.

``--memory-only`` compiles the steady step from abstract shapes and reports XLA's memory
analysis without allocating anything (so llama_7b can be sized on a machine that cannot hold
it). The figures are those of the backend that compiles: on XLA:CPU they are far above a GPU's
(llama_1b adamw: 43 GiB on CPU vs 33.7 GiB measured on an H100) and remat does not lower them,
so size a GPU run on the GPU machine. ``--profile DIR`` captures a trace of 3 steady steps per
row under ``DIR/MODEL_OPTIMIZER`` and prints where the time goes (``python -m
benchmarks.profile_summary``); such a row runs with XLA's GPU command buffers off (else a trace
shows one opaque op), so time it apart. ``--remat`` recomputes each decoder block in the
backward pass (default: on for llama_7b only). The batch defaults to the seq-256 batch scaled
by ``256 / seq`` (tokens per step about constant, >= 1).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

from benchmarks import profile_summary, report
from configs.models import MODELS as SHAPES
from train import xla_flags

# The shapes (and GaLore ranks) are configs/models.py's; this is the measurement's batch at
# seq 256 on one GPU (not the training config's global batch).
BATCH_AT_SEQ_256 = {
    "llama_tiny": 16,
    "llama_60m": 128,
    "llama_130m": 64,
    "llama_350m": 32,
    "llama_1b": 16,
    "llama_7b": 4,
}
MODELS = tuple(BATCH_AT_SEQ_256)
OPTIMIZERS = ("adamw", "galore", "galore_gram", "golore", "optax_galore")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
PROFILE_STEPS = 3
# CompiledMemoryStats fields (jax 0.10) -> our JSON names; a field missing in another jax is None.
MEMORY_FIELDS = {
    "argument_size_in_bytes": "compiled_argument_bytes",
    "output_size_in_bytes": "compiled_output_bytes",
    "alias_size_in_bytes": "compiled_alias_bytes",
    "temp_size_in_bytes": "compiled_temp_bytes",
    "generated_code_size_in_bytes": "compiled_code_bytes",
    "peak_memory_in_bytes": "compiled_xla_peak_bytes",
}


def optax_baseline(name: str, rank: int, update_every: int, lr: float = 1e-3):
    """The optax optimizers the benchmarks compare against: ``adamw`` (no decay) and
    ``optax_galore`` (optax.contrib.galore on the same matrices, GaLore's scale 0.25)."""
    import optax

    if name == "adamw":
        return optax.adamw(lr, weight_decay=0.0)
    from train import optimizer as optimizer_lib

    return optimizer_lib.optax_galore(
        lr,
        rank=rank,
        update_proj_gap=update_every,
        scale=0.25,
        base_optimizer=optax.scale_by_adam(),
    )


def _optimizer(
    name: str,
    rank: int,
    update_every: int,
    projection_dtype: str = "float32",
    refresh_batch_size: int | None = None,
):

    import golore_jax as gl

    lr = 1e-3
    if name in ("adamw", "optax_galore"):
        return optax_baseline(name, rank, update_every, lr)
    projector = {
        "galore": gl.projectors.svd(),
        "galore_gram": gl.projectors.gram_eigh(),
        "golore": gl.projectors.random(),
    }[name]
    return gl.galore_adamw(
        lr,
        subspace=gl.Subspace(rank=rank, update_every=update_every, scale=0.25, projector=projector),
        execution=gl.Execution(
            projection_dtype=projection_dtype, refresh_batch_size=refresh_batch_size
        ),
        weight_decay=0.0,
    )


def batch_size(model_name: str, seq: int, batch: int | None) -> int:
    """``batch`` if given, else the seq-256 batch scaled to keep tokens per step (>= 1)."""
    return batch or max(1, BATCH_AT_SEQ_256[model_name] * 256 // seq)


def use_remat(model_name: str, remat: bool | None) -> bool:
    """``--remat``/``--no-remat`` if given; by default only llama_7b (it does not fit without)."""
    return model_name == "llama_7b" if remat is None else remat


def model_config(
    model_name: str,
    seq: int,
    remat: bool,
    attention: str = "auto",
    param_dtype: str = "float32",
):
    """The ``LlamaConfig`` of a configs/models.py shape (its vocabulary), bf16 compute."""
    from train import model as model_lib

    shape = SHAPES[model_name]
    return model_lib.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_heads=shape.heads,
        num_layers=shape.layers,
        max_seq_len=seq,  # RoPE tables and the length check follow --seq (2048 and beyond)
        dtype="bfloat16",
        param_dtype=param_dtype,
        remat=remat,
        attention=attention,
    )


def _model(model_name: str, seq: int, remat: bool, attention: str = "auto"):
    from train import model as model_lib

    config = model_config(model_name, seq, remat, attention)
    return config, model_lib.LlamaForCausalLM(config)


def _step_fn(model, tx):
    """One train step (the trainer's loss and update, without its non-finite guard); tokens
    are arguments (not constants) so it can be lowered abstractly."""
    import jax

    from train import step as step_lib

    def loss_fn(p, inputs, targets):
        logits = model.apply({"params": p}, inputs)
        # named scopes let profile_summary tell the loss and the optimizer from the model
        with jax.named_scope("loss"):
            return step_lib.cross_entropy(logits, targets)

    def step(p, s, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(p, inputs, targets)
        with jax.named_scope("optimizer"):
            p, s = step_lib.apply_gradients(tx.update, grads, s, p)
        return p, s, loss

    return step


def _tree_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs (nothing needs to be allocated)."""
    import math

    import jax

    # dtype.itemsize, not np.dtype(...): PRNG key dtypes (key<fry>, 8 bytes) are not numpy's
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def memory_figures(compiled) -> dict:
    """XLA's memory analysis of a compiled step, and the peak it implies.

    peak estimate = arguments + temporaries + outputs - aliased (donated buffers reused as
    outputs are counted once); XLA's own ``peak_memory_in_bytes`` is reported beside it.
    """
    stats = compiled.memory_analysis()
    out = {name: getattr(stats, field, None) for field, name in MEMORY_FIELDS.items()}
    parts = ("argument", "temp", "output", "alias")
    if stats is not None and all(out[f"compiled_{p}_bytes"] is not None for p in parts):
        out["compiled_peak_estimate_bytes"] = (
            out["compiled_argument_bytes"]
            + out["compiled_temp_bytes"]
            + out["compiled_output_bytes"]
            - out["compiled_alias_bytes"]
        )
    else:
        out["compiled_peak_estimate_bytes"] = None
    return out


def _describe(
    model_name: str,
    opt_name: str,
    config: Any,
    batch: int,
    projection_dtype: str,
    params: Any,
    refresh_batch_size: int | None = None,
) -> dict:
    """The row's setting (the attention that actually runs) and its params' count and bytes."""
    import jax

    from train import model as model_lib

    return {
        "model": model_name,
        "optimizer": opt_name,
        "seq": config.max_seq_len,
        "batch": batch,
        "remat": config.remat,
        "attention": model_lib.resolve_attention(config),
        "projection_dtype": None if opt_name == "adamw" else projection_dtype,
        "refresh_batch_size": None if opt_name == "adamw" else refresh_batch_size,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
        "params_bytes": _tree_bytes(params),
    }


def compile_memory(
    model_name: str,
    opt_name: str,
    seq: int,
    batch: int | None,
    remat: bool | None = None,
    attention: str = "auto",
    projection_dtype: str = "float32",
    refresh_batch_size: int | None = None,
) -> dict:
    """Compiles the steady step from abstract shapes only and reports its memory figures."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import golore_jax as gl

    batch, remat = batch_size(model_name, seq, batch), use_remat(model_name, remat)
    config, model = _model(model_name, seq, remat, attention)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    params = jax.eval_shape(
        lambda k: nn.unbox(model.init(k, jnp.zeros((1, seq), jnp.int32))["params"]),
        jax.random.key(0),
    )
    tx = _optimizer(opt_name, SHAPES[model_name].rank, 10**6, projection_dtype, refresh_batch_size)
    state = jax.eval_shape(tx.init, params)
    result = _describe(
        model_name, opt_name, config, batch, projection_dtype, params, refresh_batch_size
    )
    result["state_floats"] = gl.optimizer_state_floats(state)
    result["state_bytes"] = _tree_bytes(state)
    t0 = time.perf_counter()
    jitted = jax.jit(_step_fn(model, tx), donate_argnums=(0, 1))
    compiled = jitted.lower(params, state, tokens, tokens).compile()
    result["compile_s"] = time.perf_counter() - t0
    result["device"] = jax.devices()[0].device_kind
    result.update(memory_figures(compiled))
    return result


def _capture_profile(compiled, p, s, inputs, targets, log_dir: pathlib.Path):
    """Traces PROFILE_STEPS steady steps; the step's optimized HLO goes beside the trace so
    that profile_summary can name each fusion by the jax op (and scope) it came from."""
    import jax

    log_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(log_dir / "step.hlo.txt.gz", "wt") as f:
        f.write(compiled.as_text())
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for i in range(PROFILE_STEPS):
            with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
                p, s, loss = compiled(p, s, inputs, targets)
                loss.block_until_ready()
    return p, s


def run_one(
    model_name: str,
    opt_name: str,
    seq: int,
    batch: int | None,
    steps: int,
    remat: bool | None = None,
    profile_dir: str | None = None,
    attention: str = "auto",
    projection_dtype: str = "float32",
    refresh_batch_size: int | None = None,
    refresh_steps: int | None = None,
) -> dict:
    """Measures one (model, optimizer) in this process (``refresh_steps`` timed refresh steps
    after the untimed first one; default ``max(3, steps // 4)``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    import golore_jax as gl

    rank = SHAPES[model_name].rank
    batch, remat = batch_size(model_name, seq, batch), use_remat(model_name, remat)
    config, model = _model(model_name, seq, remat, attention)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    params = jax.jit(lambda k: nn.unbox(model.init(k, inputs[:1])["params"]))(jax.random.key(0))
    result = _describe(
        model_name, opt_name, config, batch, projection_dtype, params, refresh_batch_size
    )

    def time_steps(tx, n):
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        jitted = jax.jit(_step_fn(model, tx), donate_argnums=(0, 1))
        compiled = jitted.lower(p, s, inputs, targets).compile()  # AOT: memory_analysis too
        p, s, loss = compiled(p, s, inputs, targets)  # first step
        loss.block_until_ready()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            p, s, loss = compiled(p, s, inputs, targets)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), compiled, p, s

    steady, compiled, p, state = time_steps(
        _optimizer(opt_name, rank, 10**6, projection_dtype, refresh_batch_size), steps
    )
    result.update(memory_figures(compiled))
    result["state_floats"] = gl.optimizer_state_floats(state)
    result["state_bytes"] = sum(
        x.nbytes for x in jax.tree_util.tree_leaves(state) if hasattr(x, "nbytes")
    )
    result["steady_step_s"] = steady
    # the peak so far: the steady run only, comparable with its compiled estimate (plus the
    # master copy of the params that time_steps keeps, params_bytes)
    result["steady_peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    if profile_dir:
        log_dir = pathlib.Path(profile_dir) / f"{model_name}_{opt_name}"
        p, state = _capture_profile(compiled, p, state, inputs, targets, log_dir)
        result["profile_dir"] = str(log_dir)
        summary = profile_summary.summarize(log_dir)
        result["profile_step_s"] = summary["step_s"]
        result["profile_categories"] = summary["categories"]
    del compiled, p, state  # free the steady run before the refresh run
    refresh = None
    if opt_name != "adamw":
        refresh, *_ = time_steps(
            _optimizer(opt_name, rank, 1, projection_dtype, refresh_batch_size),
            refresh_steps or max(3, steps // 4),
        )
    result["refresh_step_s"] = refresh
    result["device"] = jax.devices()[0].device_kind
    result.update(throughput(steady, refresh, 200, config, batch, seq, result["device"]))
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_bytes"] = stats.get("peak_bytes_in_use")
    return result


def throughput(
    steady_s: float,
    refresh_s: float | None,
    amortize_every: int,
    model_config: Any,
    batch: int,
    seq: int,
    device_kind: str,
) -> dict[str, float | None]:
    """Tokens per second of the steady step and amortized over one refresh every
    ``amortize_every`` steps (none: ``refresh_s`` None), and the steady step's MFU (bf16 peak
    of ``device_kind``, None when unknown)."""
    from train import model as model_lib

    amortized = steady_s
    if refresh_s is not None:
        amortized += (refresh_s - steady_s) / amortize_every
    tokens_per_step = batch * seq
    flops = model_lib.model_flops_per_token(model_config, seq) * tokens_per_step
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)
    return {
        "amortized_step_s": amortized,
        "steady_tokens_per_s": tokens_per_step / steady_s,
        "amortized_tokens_per_s": tokens_per_step / amortized,
        "mfu_steady": flops / steady_s / peak if peak else None,
    }


def _gib(x: float | None, digits: int = 1) -> str:
    return f"{x / 2**30:.{digits}f}" if x is not None else "-"


def _optimizer_label(row: dict) -> str:
    """The optimizer, marked when its projection matmuls ran in bf16 or its refresh calls
    were bounded."""
    notes = ["bf16 projection"] if row.get("projection_dtype") == "bfloat16" else []
    if row.get("refresh_batch_size"):
        notes.append(f"<= {row['refresh_batch_size']} per refresh call")
    return f"{row['optimizer']} ({', '.join(notes)})" if notes else row["optimizer"]


def print_table(rows: list[dict]) -> None:
    """The timing table; compiled peak = XLA's estimate for the steady step, for comparison."""
    print(
        "| model | optimizer | attention | seq x batch | state MiB | peak GiB | compiled peak GiB"
        " | steady tok/s | refresh step s | amortized tok/s (tau=200) | vs adamw | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def setting(r):  # rows compared with adamw: same model, shape and attention
        return r["model"], r["seq"], r["batch"], r.get("attention", "einsum")

    base = {setting(r): r["amortized_tokens_per_s"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        ratio = r["amortized_tokens_per_s"] / base[setting(r)] if setting(r) in base else None
        refresh = f"{r['refresh_step_s']:.3f}" if r["refresh_step_s"] else "-"
        peak = _gib(r["peak_bytes"]) if r["peak_bytes"] else "-"
        mfu = f"{r['mfu_steady']:.1%}" if r["mfu_steady"] else "-"
        vs = f"{ratio:.3f}" if ratio else "-"
        print(
            f"| {r['model']} | {_optimizer_label(r)} | {r.get('attention', 'einsum')} | "
            f"{r['seq']}x{r['batch']} | {r['state_bytes'] / 2**20:.0f} | {peak} | "
            f"{_gib(r.get('compiled_peak_estimate_bytes'))} | {r['steady_tokens_per_s']:,.0f} | "
            f"{refresh} | {r['amortized_tokens_per_s']:,.0f} | {vs} | {mfu} |"
        )


def print_memory_table(rows: list[dict]) -> None:
    """The --memory-only table (GiB; nothing was run, so there is no measured peak)."""
    print(
        "| model | optimizer | seq x batch | remat | params GiB | state GiB | arguments GiB"
        " | outputs GiB | aliased GiB | temp GiB | peak estimate GiB | XLA peak GiB | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {_optimizer_label(r)} | {r['seq']}x{r['batch']} | "
            f"{'yes' if r['remat'] else 'no'} | {_gib(r['params_bytes'], 2)} | "
            f"{_gib(r['state_bytes'], 2)} | {_gib(r['compiled_argument_bytes'], 2)} | "
            f"{_gib(r['compiled_output_bytes'], 2)} | {_gib(r['compiled_alias_bytes'], 2)} | "
            f"{_gib(r['compiled_temp_bytes'], 2)} | "
            f"{_gib(r['compiled_peak_estimate_bytes'], 2)} | "
            f"{_gib(r['compiled_xla_peak_bytes'], 2)} | {r['compile_s']:.1f} |"
        )


def _child_command(model_name: str, opt_name: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--one", model_name, opt_name]
    cmd += ["--seq", str(args.seq), "--steps", str(args.steps), "--attention", args.attention]
    cmd += ["--projection-dtype", args.projection_dtype]
    if args.refresh_batch_size:
        cmd += ["--refresh-batch-size", str(args.refresh_batch_size)]
    if args.refresh_steps:
        cmd += ["--refresh-steps", str(args.refresh_steps)]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.remat is not None:
        cmd += ["--remat" if args.remat else "--no-remat"]
    if args.memory_only:
        cmd += ["--memory-only"]
    if args.profile:
        cmd += ["--profile", args.profile]
    return cmd


def _run_child(args: argparse.Namespace) -> dict:
    model_name, opt_name = args.one
    if args.memory_only:
        return compile_memory(
            model_name,
            opt_name,
            args.seq,
            args.batch,
            args.remat,
            args.attention,
            args.projection_dtype,
            args.refresh_batch_size,
        )
    return run_one(
        model_name,
        opt_name,
        args.seq,
        args.batch,
        args.steps,
        args.remat,
        args.profile,
        args.attention,
        args.projection_dtype,
        args.refresh_batch_size,
        args.refresh_steps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="llama_60m")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None, help="default: seq-256 batch * 256/seq")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute decoder blocks in the backward pass (default: llama_7b only)",
    )
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="compile from abstract shapes and report XLA's memory analysis; run nothing",
    )
    parser.add_argument(
        "--attention",
        choices=("auto", "einsum", "cudnn"),
        default="auto",
        help="model.attention (auto: cuDNN flash attention where it runs, else einsum)",
    )
    parser.add_argument(
        "--projection-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="galore/golore: operand dtype of the projection matmuls P^T G and P N",
    )
    parser.add_argument(
        "--refresh-batch-size",
        type=int,
        default=None,
        help="galore/golore: at most this many matrices per stacked refresh call (default: all)",
    )
    parser.add_argument(
        "--refresh-steps",
        type=int,
        default=None,
        help="timed refresh steps (after an untimed first one; default max(3, steps // 4)): "
        "1 for a refresh of minutes, e.g. optax.contrib.galore's per-leaf SVD at 1B",
    )
    parser.add_argument("--profile", metavar="DIR", default=None, help="trace 3 steady steps")
    parser.add_argument("--profile-top", type=int, default=15, help="ops listed per profile")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per (model, opt)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    xla_flags.apply_defaults()  # before JAX starts a backend; children inherit it
    if args.one:
        if args.profile:
            # GPU command buffers (CUDA graphs) show as one opaque op in a trace: a profiled row
            # runs without them (its timings too), so each kernel is named by its HLO op.
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()
        report.print_result(_run_child(args))
        return
    rows = []
    for model_name in args.models.split(","):
        for opt_name in args.optimizers.split(","):
            cmd = _child_command(model_name, opt_name, args)
            child_rows, error = report.run_child(cmd, args.timeout)
            if not child_rows:
                print(f"{model_name} {opt_name} failed:\n{error}", flush=True)
                continue
            rows.append(child_rows[-1])
            print(json.dumps(rows[-1]), flush=True)
    print()
    if args.memory_only:
        print_memory_table(rows)
    else:
        print_table(rows)
    for r in rows:
        if r.get("profile_dir"):
            print(f"\n### {r['model']} {r['optimizer']}: {r['profile_dir']}\n")
            print(
                profile_summary.format_summary(
                    profile_summary.summarize(r["profile_dir"]), args.profile_top
                )
            )
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
