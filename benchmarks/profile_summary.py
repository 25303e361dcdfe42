"""Where the time goes: the top ops of a ``jax.profiler`` trace, by total time per step.

    python -m benchmarks.profile_summary DIR --top 20 [--json OUT]

``DIR`` is a ``jax.profiler.trace`` log dir (or a folder of them, e.g. ``train_step.py
--profile DIR``, or one ``*.trace.json.gz``); the newest trace under each log dir is read.
Which events count as ops, by what the trace holds:

* GPU/TPU: the events of the ``/device:*`` processes (the ``XLA Ops`` line if there is one,
  else the stream kernels), grouped by their HLO op;
* XLA:CPU: the host events that carry an ``hlo_op`` (one per executed thunk);
* otherwise every host event, grouped by name.

An event's time is its self time (less the events nested in it on its thread).

Each op gets a category (matmul in the model, attention softmax, loss, optimizer update,
projection, projector refresh, ...) from the jax op name (``metadata={op_name=...}``, which
carries the ``named_scope``s and Flax module path) found in an HLO text dump beside the trace
(``*.hlo.txt[.gz]``, which ``train_step.py --profile`` writes) or in the event's own args.
Shares are of the step time: the host ``StepTraceAnnotation`` events if present. XLA:CPU runs
independent thunks in parallel, so its op time can add up to more than the step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import pathlib
import re
from typing import Any

TRACE_PATTERNS = ("*.trace.json.gz", "perfetto_trace.json.gz", "*.trace.json", "*.json.gz")
MATMUL_NAME = re.compile(r"gemm|dot|matmul|cublas|cutlass|xmma|convolution|cudnn", re.I)
DATA_MOVEMENT = re.compile(r"copy|transpose|bitcast|convert|concatenate|slice|pad|broadcast", re.I)
# jax primitives in an op path (whole words: "qr" but not "rsqrt"), and solver custom calls
DECOMPOSITION_OP = re.compile(r"(?<![a-z])(?:eigh|svd|qr|householder_product)(?![a-z])")
DECOMPOSITION_CALL = re.compile(r"syevd|gesvd|gesdd|geqrf|orgqr|cusolver|lapack", re.I)
INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = (.*)$")
COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
NON_OP_THREADS = re.compile(
    r"steps|xla modules|async xla ops|tensorflow|framework|source|launch stats|python|trace", re.I
)


@dataclasses.dataclass
class HloInfo:
    """What the optimized HLO says about one instruction."""

    op_name: str = ""
    opcode: str = ""
    matmul: bool = False
    target: str = ""  # custom_call_target, if any


def _split_type(rest: str) -> str:
    """Drops the leading result type (``f32[..]{..}`` or a parenthesised tuple) of ``rest``."""
    if not rest.startswith("("):
        return rest.split(" ", 1)[-1]
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[i + 1 :].lstrip()
    return rest


def parse_hlo(text: str) -> dict[str, HloInfo]:
    """Instruction name -> HloInfo for every instruction of an HLO module's text.

    A fusion without metadata of its own takes the op name of the first matmul in its fused
    computation, else of any instruction there that has one.
    """
    comps: dict[str, list[tuple[str, HloInfo, list[str]]]] = collections.defaultdict(list)
    current = ""
    for line in text.splitlines():
        if m := COMPUTATION.match(line):
            current = m.group(1)
            continue
        if not (m := INSTRUCTION.match(line)):
            continue
        name, rest = m.groups()
        body = _split_type(rest)
        opcode = body.split("(", 1)[0].strip()
        op_name = re.search(r'op_name="([^"]*)"', body)
        target = re.search(r'custom_call_target="([^"]*)"', body)
        info = HloInfo(
            op_name=op_name.group(1) if op_name else "",
            opcode=opcode,
            target=target.group(1) if target else "",
        )
        info.matmul = opcode in ("dot", "convolution") or bool(
            info.target and MATMUL_NAME.search(info.target)
        )
        called = re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", body)
        comps[current].append((name, info, called))
    infos = {name: info for insts in comps.values() for name, info, _ in insts}
    for insts in comps.values():
        for _, info, called in insts:
            inner = [i for c in called for _, i, _ in comps.get(c, [])]
            info.matmul = info.matmul or any(i.matmul for i in inner)
            info.target = info.target or next((i.target for i in inner if i.target), "")
            if not info.op_name:
                named = [i for i in inner if i.op_name]
                first = next((i for i in named if i.matmul), named[0] if named else None)
                info.op_name = first.op_name if first else ""
    return infos


def _scope(path: str, name: str) -> bool:
    """Whether ``name`` is a scope of the jax op path (``a/b``, ``jvp(b)``, ``transpose(..)``)."""
    return re.search(rf"(?:^|[/(]){re.escape(name)}(?:[)/]|$)", path) is not None


def categorize(name: str, info: HloInfo) -> str:
    """Where an op's time goes, from its jax op path (scopes, Flax modules) and HLO kind."""
    path = info.op_name
    matmul = info.matmul or bool(MATMUL_NAME.search(name))
    if _scope(path, "optimizer"):
        # the refresh is the optimizer's lax.cond branch (and its eigh/svd/qr custom calls)
        if (
            _scope(path, "cond")
            or DECOMPOSITION_OP.search(path)
            or DECOMPOSITION_CALL.search(info.target)
        ):
            return "projector refresh"
        return "optimizer: projection matmul" if matmul else "optimizer: update (elementwise)"
    if _scope(path, "loss"):
        return "loss (softmax xent)"
    if "lm_head" in path:
        return "lm_head matmul" if matmul else "lm_head other"
    if "self_attn" in path and "_proj" not in path:
        return "attention QK/PV matmul" if matmul else "attention softmax/mask/RoPE"
    if matmul and ("_proj" in path or "mlp" in path):
        return "dense matmul (q/k/v/o, MLP)"
    if "norm" in path:
        return "RMSNorm"
    if "mlp" in path:
        return "MLP SwiGLU elementwise"
    if "embed_tokens" in path:
        return "embedding"
    if matmul:
        return "other matmul"
    if path:
        return "other"
    # XLA gives layout copies and casts it inserts no jax op name
    return "copy/convert (no jax op)" if DATA_MOVEMENT.search(name) else "unattributed"


def phase(info: HloInfo) -> str:
    path = info.op_name
    if _scope(path, "optimizer"):
        return "opt"
    if "transpose(" in path:
        return "bwd"
    return "fwd" if "jvp(" in path else "-"


def find_traces(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The newest trace of each log dir under ``path`` (or ``path`` itself if a file)."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    newest: dict[pathlib.Path, pathlib.Path] = {}
    for pattern in TRACE_PATTERNS:
        for f in path.rglob(pattern):
            root = f.parents[3] if f.parent.parent.name == "profile" else f.parent
            if root not in newest or (
                f.parent != newest[root].parent and f.stat().st_mtime > newest[root].stat().st_mtime
            ):
                newest[root] = f
    if not newest:
        raise FileNotFoundError(f"no trace ({', '.join(TRACE_PATTERNS)}) under {path}")
    return [newest[r] for r in sorted(newest)]


def load_trace(path: pathlib.Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {"traceEvents": data}


def load_hlo(trace: pathlib.Path) -> dict[str, HloInfo]:
    """HLO dumps near the trace: its log dir (up to 3 levels up from ``plugins/profile/RUN``)."""
    infos: dict[str, HloInfo] = {}
    for folder in list(trace.parents)[:4]:
        for f in sorted(folder.glob("*.hlo.txt*")) + sorted(
            folder.glob("*after_optimizations.txt")
        ):
            opener = gzip.open if f.suffix == ".gz" else open
            with opener(f, "rt") as fh:
                infos.update(parse_hlo(fh.read()))
        if infos:
            break
    return infos


def _names(events: list[dict]) -> tuple[dict, dict]:
    """Process and thread names from the metadata events."""
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e.get("pid")] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e.get("pid"), e.get("tid"))] = e.get("args", {}).get("name", "")
    return procs, threads


def select_ops(events: list[dict]) -> tuple[list[dict], str]:
    """The op events of the trace and a word on where they came from (see module doc)."""
    procs, threads = _names(events)
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if procs.get(e.get("pid"), "").startswith("/device:")]
    if device:
        xla_ops = [e for e in device if threads.get((e["pid"], e.get("tid"))) == "XLA Ops"]
        if xla_ops:
            return xla_ops, "device XLA Ops"
        kernels = [
            e
            for e in device
            if not NON_OP_THREADS.search(threads.get((e["pid"], e.get("tid")), ""))
        ]
        return kernels or device, "device kernels"
    thunks = [
        e for e in spans if "hlo_op" in e.get("args", {}) and not e["name"].startswith("end: ")
    ]
    if thunks:
        return thunks, "XLA:CPU thunks (parallel: may exceed the step)"
    return spans, "host events by name"


def self_times(ops: list[dict]) -> list[float]:
    """Each event's duration less that of the events nested in it on the same thread (a
    while/conditional op around its body's ops, nested host events): no time counted twice."""
    selfs = [float(e["dur"]) for e in ops]
    by_thread: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, e in enumerate(ops):
        by_thread[(e.get("pid"), e.get("tid"))].append(i)
    for idx in by_thread.values():
        idx.sort(key=lambda i: (float(ops[i]["ts"]), -float(ops[i]["dur"])))
        stack: list[int] = []  # open events, outermost first
        for i in idx:
            start = float(ops[i]["ts"])
            while stack and float(ops[stack[-1]]["ts"]) + float(ops[stack[-1]]["dur"]) <= start:
                stack.pop()
            if stack:
                selfs[stack[-1]] -= float(ops[i]["dur"])
            stack.append(i)
    return [max(0.0, t) for t in selfs]


def step_times(events: list[dict], ops: list[dict]) -> list[float]:
    """Durations (us) of the profiled steps: step annotations, else the span of the ops."""
    steps = [
        e for e in events if e.get("ph") == "X" and "step_num" in e.get("args", {}) and "dur" in e
    ]
    if steps:
        # one annotation per step, whatever the thread/process; keep the longest of duplicates
        by_step: dict[str, float] = {}
        for e in steps:
            key = str(e["args"]["step_num"])
            by_step[key] = max(by_step.get(key, 0.0), float(e["dur"]))
        return list(by_step.values())
    if not ops:
        return []
    start = min(float(e["ts"]) for e in ops)
    end = max(float(e["ts"]) + float(e["dur"]) for e in ops)
    return [end - start]


def _op_key(e: dict) -> tuple[str, str]:
    args = e.get("args", {})
    return str(args.get("hlo_op") or e.get("name", "?")), str(args.get("hlo_module", ""))


def _event_info(e: dict, hlo: dict[str, HloInfo], op: str) -> HloInfo:
    """The op's HLO info: the dump's, else what the event's args say (``tf_op``, long_name)."""
    if op in hlo:
        return hlo[op]
    args = e.get("args", {})
    long_name = str(args.get("long_name", ""))
    found = re.search(r'op_name="([^"]*)"', long_name)
    op_name = str(args.get("tf_op", "")) or (found.group(1) if found else "")
    return HloInfo(op_name=op_name, matmul=bool(MATMUL_NAME.search(op + " " + long_name)))


def summarize(path: str | pathlib.Path, top: int | None = None) -> dict:
    """Per-op and per-category time of the newest trace under ``path`` (a log dir or file)."""
    trace = find_traces(path)[-1] if pathlib.Path(path).is_dir() else pathlib.Path(path)
    events = load_trace(trace).get("traceEvents", [])
    hlo = load_hlo(trace)
    ops, source = select_ops(events)
    steps = step_times(events, ops)
    n_steps = max(1, len(steps))
    step_us = sum(steps) / n_steps if steps else 0.0
    totals: dict[tuple[str, str], list] = {}
    for e, self_us in zip(ops, self_times(ops), strict=True):
        key = _op_key(e)
        if key not in totals:
            totals[key] = [0.0, 0, _event_info(e, hlo, key[0])]
        totals[key][0] += self_us
        totals[key][1] += 1
    modules = {m for _, m in totals}
    rows = []
    for (op, module), (total, count, info) in totals.items():
        per_step = total / n_steps
        rows.append(
            {
                "op": f"{module}:{op}" if len(modules) > 1 and module else op,
                "category": categorize(op, info),
                "phase": phase(info),
                "op_name": info.op_name,
                "count_per_step": count / n_steps,
                "per_step_s": per_step * 1e-6,
                "share": per_step / step_us if step_us else None,
            }
        )
    rows.sort(key=lambda r: -r["per_step_s"])
    cats: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        cats[r["category"]][0] += r["per_step_s"]
        cats[r["category"]][1] += 1
    categories = [
        {
            "category": c,
            "per_step_s": t,
            "share": t / (step_us * 1e-6) if step_us else None,
            "ops": n,
        }
        for c, (t, n) in sorted(cats.items(), key=lambda kv: -kv[1][0])
    ]
    busy = sum(r["per_step_s"] for r in rows)
    return {
        "trace": str(trace),
        "source": source,
        "hlo_ops_named": len(hlo),
        "steps": len(steps),
        "step_s": step_us * 1e-6,
        "op_time_per_step_s": busy,
        "ops": rows[:top] if top else rows,
        "categories": categories,
    }


def _short(op_name: str, width: int = 70) -> str:
    """The tail of a jax op path (the informative end), without the outer ``jit(step)/``."""
    op_name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    return op_name if len(op_name) <= width else "..." + op_name[-(width - 3) :]


def _share(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "-"


def format_summary(summary: dict, top: int = 20) -> str:
    """Markdown tables: the top ops, then the time per category."""
    lines = [
        f"trace: {summary['trace']}",
        f"ops from: {summary['source']}; {summary['steps']} steps of "
        f"{summary['step_s'] * 1e3:.2f} ms; op time per step "
        f"{summary['op_time_per_step_s'] * 1e3:.2f} ms; "
        f"HLO instructions named from a dump: {summary['hlo_ops_named']}",
        "",
        "| # | op | category | phase | per step ms | share of step | calls/step | jax op |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(summary["ops"][:top], 1):
        lines.append(
            f"| {i} | {r['op']} | {r['category']} | {r['phase']} | {r['per_step_s'] * 1e3:.3f} | "
            f"{_share(r['share'])} | {r['count_per_step']:g} | {_short(r['op_name'])} |"
        )
    lines += ["", "| category | per step ms | share of step | ops |", "|---|---|---|---|"]
    for c in summary["categories"]:
        lines.append(
            f"| {c['category']} | {c['per_step_s'] * 1e3:.3f} | {_share(c['share'])} | {c['ops']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("path", help="jax.profiler log dir, a folder of them, or a trace file")
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the summaries (all ops) here")
    args = parser.parse_args(argv)
    summaries: list[dict[str, Any]] = []
    for trace in find_traces(args.path):
        summaries.append(summarize(trace))
        print(format_summary(summaries[-1], args.top), end="\n\n")
    if args.json:
        from benchmarks import report

        report.write_json(summaries, args.json)


if __name__ == "__main__":
    main()
