"""The PyTorch reference: galore-torch's GaLoreAdamW and torch AdamW on a HF LlamaForCausalLM.

    python -m benchmarks.galore_torch_step --models llama_60m,llama_350m,llama_1b \
        --json benchmarks/results/galore_torch_step.json
    python -m benchmarks.galore_torch_step --device cpu --tiny          # smoke test

The side-by-side of :mod:`benchmarks.train_step` (same models, ranks, batches at seq 256):
``LlamaForCausalLM`` (transformers) in bf16 (``model.to(torch.bfloat16)``, as GaLore's
``torchrun_main.py --dtype bfloat16``), sdpa attention, random tokens, loss on the inputs
shifted by one (``labels=input_ids``). Optimizers:

* ``galore_torch``: ``galore_torch.GaLoreAdamW`` (galore-torch 1.0) with GaLore's param groups:
  every ``nn.Linear`` whose module name contains ``attn`` or ``mlp`` in the GaLore group
  (rank 128/256/512, ``update_proj_gap=200``, ``scale=0.25``, ``proj_type="std"``), everything
  else (embeddings, norms, ``lm_head``) in the regular group; lr 1e-3, no weight decay.
* ``galore_torch_per_layer``: GaLore's layer-wise mode (``torchrun_main.py --optimizer
  galore_adamw_per_layer``): one ``GaLoreAdamW`` per parameter (GaLore group or regular, as
  above), each stepped (and its gradient freed) from that parameter's
  ``register_post_accumulate_grad_hook`` during the backward pass, so all gradients never
  exist at once.
* ``galore_torch_8bit`` / ``galore_torch_8bit_per_layer``: the same with ``GaLoreAdamW8bit``
  (needs bitsandbytes; the row fails with that message when it is not installed).
* ``adamw``: ``torch.optim.AdamW`` (fused where available), the torch baseline.

``--random-basis`` replaces galore-torch's SVD (``GaLoreProjector.get_orthogonal_matrix``) by
the Q factor of a Gaussian matrix of the same shape and dtype: same memory, no minutes-long
SVDs at 7B, but not GaLore's subspace; use it only when memory is measured (every row says
which projector ran). ``--grad-checkpointing`` recomputes each decoder layer in the backward
pass (``model.gradient_checkpointing_enable()``; default: on for llama_7b only, as the 7B
figures of issue 19 were measured).

galore-torch's ``__init__`` imports bitsandbytes (for ``GaLoreAdamW8bit``), which is not
needed here: a stub ``bitsandbytes.optim.optimizer.Optimizer2State`` is put in ``sys.modules``
when the real package is missing. galore-torch itself is imported from the environment or, if
absent, straight from its wheel (``.whl/galore_torch-1.0-py3-none-any.whl``, pure Python, on
``sys.path`` as a zip) so that nothing has to be installed.

Timing. galore-torch refreshes a matrix's projector when its step counter (0-based, counted
per parameter) is a multiple of ``update_proj_gap``, so optimizer step 0 refreshes. The first
``--warmup`` steps (including that refresh and CUDA/cuBLAS warm-up) are not timed; steady steps
are the next ``--steps`` (no refresh, as long as warmup + steps < update_proj_gap). Then
every projector's gap is set to 1 and ``--refresh-steps`` steps (1 if the first step took over
10 s) are timed: the refresh step (SVD of every GaLore matrix). Amortized over
``update_proj_gap`` (200; 500 for llama_7b): ``steady + (refresh - steady) / gap``. Peak memory
is ``torch.cuda.max_memory_allocated`` counted from after the model is built (the model is
initialised in fp32 on the device and cast to bf16: that transient is ``init_peak_bytes``),
over the whole run (warmup and refresh steps included: ``peak_bytes``) and over the steady
steps alone (``peak_steady_bytes``, the figure GaLore's anchor script prints). Each (model,
optimizer) runs in its own process.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import pathlib
import statistics
import sys
import time
import types
from typing import Any

from benchmarks import report
from benchmarks.train_step import BATCH_AT_SEQ_256
from configs.models import MODELS as SHAPES
from configs.models import SMOKE_MODELS

# Shapes and GaLore ranks: configs/models.py; batch at seq 256: benchmarks/train_step.py's.
MODELS = ("llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
TINY, TINY_BATCH, TINY_SEQ = "llama_micro", 2, 32  # --tiny: the CPU smoke test
OPTIMIZERS = (
    "adamw",
    "galore_torch",
    "galore_torch_per_layer",
    "galore_torch_8bit",
    "galore_torch_8bit_per_layer",
)
UPDATE_PROJ_GAP = 200  # GaLore's update_proj_gap; 500 for its 7B recipe
UPDATE_PROJ_GAP_7B = 500
REPO = pathlib.Path(__file__).resolve().parents[1]


def import_galore_torch() -> Any:
    """Imports ``galore_torch`` (from the environment or its wheel), stubbing bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        import torch

        stub_optimizer = types.ModuleType("bitsandbytes.optim.optimizer")

        class Optimizer2State(torch.optim.Optimizer):
            """Stand-in base of galore_torch.GaLoreAdamW8bit (not used here)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ImportError("bitsandbytes is not installed (stubbed for galore_torch)")

        stub_optimizer.Optimizer2State = Optimizer2State
        stub = types.ModuleType("bitsandbytes")
        stub_optim = types.ModuleType("bitsandbytes.optim")
        stub.optim = stub_optim
        stub_optim.optimizer = stub_optimizer
        sys.modules.update(
            {
                "bitsandbytes": stub,
                "bitsandbytes.optim": stub_optim,
                "bitsandbytes.optim.optimizer": stub_optimizer,
            }
        )
    try:
        import galore_torch
    except ImportError:
        wheels = sorted(glob.glob(str(REPO / ".whl" / "galore_torch-*.whl")))
        if not wheels:
            raise
        sys.path.insert(0, wheels[-1])
        import galore_torch
    return galore_torch


def update_proj_gap(model_name: str) -> int:
    return UPDATE_PROJ_GAP_7B if model_name == "llama_7b" else UPDATE_PROJ_GAP


def _galore_params(model: Any) -> list[Any]:
    """GaLore's ``torchrun_main.py`` choice: the weights of attn/mlp ``nn.Linear`` modules."""
    from torch import nn

    return [
        module.weight
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(key in name for key in ("attn", "mlp"))
    ]


def _galore_group(params: list[Any], rank: int, gap: int) -> dict:
    return {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25}


def galore_param_groups(model: Any, rank: int, gap: int = UPDATE_PROJ_GAP) -> list[dict]:
    """GaLore's ``torchrun_main.py`` groups: attn/mlp ``nn.Linear`` weights get the projector."""
    galore_params = _galore_params(model)
    ids = {id(p) for p in galore_params}
    regular = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": regular}, _galore_group(galore_params, rank, gap) | {"proj_type": "std"}]


def per_layer_optimizers(
    model: Any, optimizer_cls: Any, rank: int, gap: int, **kwargs: Any
) -> list[Any]:
    """One optimizer per parameter, stepped from its post-accumulate-grad hook (GaLore's
    ``*_per_layer`` mode): a gradient is used and freed as soon as the backward pass has it."""
    ids = {id(p) for p in _galore_params(model)}
    optimizers = {}
    for p in model.parameters():
        group = _galore_group([p], rank, gap) | {"proj_type": "std"} if id(p) in ids else None
        optimizers[p] = optimizer_cls(
            [group or {"params": [p]}], lr=1e-3, weight_decay=0.0, **kwargs
        )

    def hook(p: Any) -> None:
        if p.grad is None:
            return
        optimizers[p].step()
        optimizers[p].zero_grad(set_to_none=True)

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    return list(optimizers.values())


def use_random_basis(galore_torch: Any) -> None:
    """Swaps galore-torch's SVD for a random orthonormal basis of the same shape and dtype
    (memory measurements only)."""
    import torch

    def random_orthogonal(self: Any, weights: Any, rank: int, type: str) -> Any:
        m, n = weights.shape
        dim = n if type == "right" else m
        q, _ = torch.linalg.qr(torch.randn(dim, rank, device=weights.device))
        return (q.t() if type == "right" else q).to(weights.dtype)

    galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix = random_orthogonal


def run_one(model_name: str, opt_name: str, args: argparse.Namespace) -> dict:
    """Measures one (model, optimizer) in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    if args.tiny:
        shape, default_batch, seq = SMOKE_MODELS[TINY], TINY_BATCH, TINY_SEQ
    else:
        shape, default_batch, seq = SHAPES[model_name], BATCH_AT_SEQ_256[model_name], args.seq
    hidden, inter, heads, layers = shape.hidden, shape.intermediate, shape.heads, shape.layers
    vocab, rank = shape.vocab, shape.rank
    batch = args.batch or max(1, default_batch * 256 // seq)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=max(seq, 1024),
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    gap = update_proj_gap(model_name)
    checkpointing = (
        model_name == "llama_7b" if args.grad_checkpointing is None else (args.grad_checkpointing)
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device (a 7B on the CPU takes minutes)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    cuda = device.type == "cuda"
    # The fp32 initialisation is transient: peaks below are counted from here (init apart).
    init_peak = torch.cuda.max_memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    per_layer = opt_name.endswith("_per_layer")
    projector_kind = "svd (galore-torch's)"
    if opt_name.startswith("galore_torch"):
        galore_torch = import_galore_torch()
        if args.random_basis:
            use_random_basis(galore_torch)
            projector_kind = "random orthonormal (QR of a Gaussian; memory measurement only)"
        eight_bit = "_8bit" in opt_name
        optimizer_cls = galore_torch.GaLoreAdamW8bit if eight_bit else galore_torch.GaLoreAdamW
        kwargs = {} if eight_bit else {"no_deprecation_warning": True}
        if per_layer:
            optimizers = per_layer_optimizers(model, optimizer_cls, rank, gap, **kwargs)
        else:
            groups = galore_param_groups(model, rank, gap)
            optimizers = [optimizer_cls(groups, lr=1e-3, weight_decay=0.0, **kwargs)]
        impl = (
            f"galore_torch {importlib.metadata.version('galore-torch')} "
            f"{optimizer_cls.__name__}{' per parameter' if per_layer else ''} "
            f"({galore_torch.__file__})"
        )
    elif opt_name == "adamw":
        try:
            optimizers = [
                torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, fused=True)
            ]
            impl = "torch.optim.AdamW(fused=True)"
        except (RuntimeError, TypeError, ValueError):
            optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)]
            impl = "torch.optim.AdamW"
    else:
        raise ValueError(f"unknown optimizer {opt_name!r}")

    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> torch.Tensor:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()  # per-layer mode: each parameter is updated inside its hook
        if not per_layer:
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
        return loss

    def timed(n: int) -> list[float]:
        if n == 0:
            return []
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss.detach().float()):
            raise FloatingPointError(f"{model_name} {opt_name}: loss is {float(loss)}")
        return times

    if args.warmup + args.steps >= gap:
        raise ValueError(f"warmup + steps must be < {gap} (no refresh while steady)")
    first = timed(1)[0]  # optimizer step 0: galore-torch refreshes every projector here
    timed(args.warmup - 1)
    peak_warmup = torch.cuda.max_memory_allocated(device) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    steady_times = timed(args.steps)
    steady = statistics.median(steady_times)
    peak_steady = torch.cuda.max_memory_allocated(device) if cuda else None
    result: dict[str, Any] = {
        "model": TINY if args.tiny else model_name,
        "optimizer": opt_name,
        "impl": impl,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seq": seq,
        "batch": batch,
        "params": n_params,
        "rank": rank if opt_name != "adamw" else None,
        "per_layer": per_layer,
        "grad_checkpointing": checkpointing,
        "projector": projector_kind if opt_name != "adamw" else None,
        "update_proj_gap": gap if opt_name != "adamw" else None,
        "status": "ok",
        "first_step_s": first,
        "init_peak_bytes": init_peak,
        "steady_step_s": steady,
        "steady_step_min_s": min(steady_times),
    }
    states = [s for optimizer in optimizers for s in optimizer.state.values()]
    state_tensors = [t for s in states for t in s.values() if isinstance(t, torch.Tensor)]
    projectors = [s["projector"] for s in states if "projector" in s]
    projector_bytes = sum(
        p.ortho_matrix.numel() * p.ortho_matrix.element_size() for p in projectors
    )
    result["state_bytes"] = sum(t.numel() * t.element_size() for t in state_tensors)
    result["state_bytes"] += projector_bytes
    if opt_name != "adamw":
        for p in projectors:
            p.update_proj_gap = 1  # every step refreshes from now on
        # A long first step means a long refresh: then one more refresh step is enough.
        refresh = statistics.median(timed(1 if first > 10.0 else args.refresh_steps))
        result["refresh_step_s"] = refresh
        result["amortized_step_s"] = steady + (refresh - steady) / gap
        result["galore_matrices"] = len(projectors)
    else:
        result["refresh_step_s"] = None
        result["amortized_step_s"] = steady
    tokens_per_step = batch * seq
    result["steady_tokens_per_s"] = tokens_per_step / steady
    result["amortized_tokens_per_s"] = tokens_per_step / result["amortized_step_s"]
    result["peak_bytes"] = (
        max(peak_warmup, torch.cuda.max_memory_allocated(device)) if cuda else None
    )
    result["peak_steady_bytes"] = peak_steady
    return result


def _gib(x: float | None) -> str:
    return "-" if not x else f"{x / 2**30:.1f}"


def print_table(rows: list[dict]) -> None:
    """The markdown table (one row per (model, optimizer))."""
    print(
        "| model | optimizer | seq x batch | state MiB | peak GiB (steady / with refresh) "
        "| steady step ms | steady tok/s | refresh step s | amortized tok/s (gap) | vs adamw |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {r["model"]: r["amortized_tokens_per_s"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        if r.get("status", "ok") != "ok":
            print(f"| {r['model']} | {r['optimizer']} | {r['status']}: {r['error'][:120]} |")
            continue
        ratio = r["amortized_tokens_per_s"] / base[r["model"]] if r["model"] in base else None
        refresh = f"{r['refresh_step_s']:.3f}" if r["refresh_step_s"] else "-"
        print(
            f"| {r['model']} | {r['optimizer']} | {r['seq']}x{r['batch']} | "
            f"{r['state_bytes'] / 2**20:.0f} | {_gib(r['peak_steady_bytes'])} / "
            f"{_gib(r['peak_bytes'])} | {r['steady_step_s'] * 1e3:.1f} | "
            f"{r['steady_tokens_per_s']:,.0f} | {refresh} | "
            f"{r['amortized_tokens_per_s']:,.0f} ({r['update_proj_gap'] or '-'}) | "
            f"{f'{ratio:.3f}' if ratio else '-'} |"
        )
    projectors = sorted({r["projector"] for r in rows if r.get("projector")})
    if projectors:
        print(f"\nProjector: {'; '.join(projectors)}.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="llama_60m")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, first included")
    parser.add_argument("--steps", type=int, default=20, help="timed steady steps")
    parser.add_argument("--refresh-steps", type=int, default=3, help="timed refresh steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--random-basis",
        action="store_true",
        help="replace galore-torch's SVD by a random orthonormal basis (memory only; stated)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute decoder layers in the backward pass (default: llama_7b only)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    parser.add_argument("--timeout", type=float, default=480.0, help="per subprocess, s")
    parser.add_argument("--json", default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step refreshes)")
    if args.one:
        report.print_result(run_one(*args.one, args))
        return
    models = [TINY] if args.tiny else args.models.split(",")
    rows = []
    for model_name in models:
        for opt_name in args.optimizers.split(","):
            cmd = [sys.executable, "-m", "benchmarks.galore_torch_step", "--one", model_name]
            cmd += [opt_name, "--seq", str(args.seq), "--warmup", str(args.warmup)]
            cmd += ["--steps", str(args.steps), "--refresh-steps", str(args.refresh_steps)]
            cmd += ["--device", args.device] + (["--tiny"] if args.tiny else [])
            cmd += ["--random-basis"] if args.random_basis else []
            if args.grad_checkpointing is not None:
                cmd += [
                    "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing"
                ]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            child_rows, error = report.run_child(cmd, args.timeout)
            if not child_rows:  # recorded, and the next row runs
                print(f"{model_name} {opt_name} failed:\n{error}", flush=True)
                lines = [ln for ln in error.strip().splitlines() if ln.strip()]
                oom = "out of memory" in error.lower()
                child_rows = [
                    {
                        "model": model_name,
                        "optimizer": opt_name,
                        "status": "OOM" if oom else "failed",
                        "error": lines[-1] if lines else "no output",
                    }
                ]
            rows.append(child_rows[-1])
            print(json.dumps(rows[-1]), flush=True)
    print()
    print_table(rows)
    report.write_json(rows, args.json)


if __name__ == "__main__":
    main()
