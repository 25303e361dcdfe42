"""Host memory of the streaming input pipeline over a prepared TFDS copy, and an exact resume.

Prepares (once) an ArrayRecord TFDS copy of generated text (``--mb`` megabytes in documents of
C4-like length), then, in a fresh process, streams ``--steps`` batches through
``train.data.build_datasets(source='tfds')`` printing the resident set size (RSS) at several
steps, and checks that a new pipeline restored from the JSON state taken at ``--resume_at``
yields exactly the batches of the uninterrupted one.

    nice -n 10 python experiments/streaming_rss.py --data_dir /tmp/streaming_corpus --mb 400

The copy is named ``streaming_corpus`` (split ``train`` and a small ``validation``); the trainer
reads it like any prepared copy, e.g. ``--config.data.source=tfds
--config.data.tfds_name=streaming_corpus --config.data.data_dir=/tmp/streaming_corpus``.
``--train_steps N`` then pre-trains llama_tiny on it through ``python -m train`` (RSS sampled
every second), and repeats the run stopped at ``--train_resume_at`` and resumed, comparing the
losses.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

# Generated documents: words drawn from a Zipf-like law over a fixed made-up vocabulary, with
# C4's typical document lengths (a few hundred to a few thousand characters).
_VOCAB_WORDS = 20_000
_DOCS_PER_SHARD_HINT = 50_000


def _words(rng: np.random.Generator) -> np.ndarray:
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 10, size=_VOCAB_WORDS)
    return np.array(["".join(rng.choice(letters, size=n)) for n in lengths])


def generate_documents(total_mb: float, seed: int, first_id: int = 0):
    """Yields ``(key, text)`` until about ``total_mb`` megabytes of text."""
    rng = np.random.default_rng(seed)
    words = _words(np.random.default_rng(0))  # The same vocabulary for every split.
    cdf = np.cumsum(1.0 / np.arange(1, _VOCAB_WORDS + 1))
    cdf /= cdf[-1]
    produced, key = 0, first_id
    while produced < total_mb * 1e6:
        n = int(rng.integers(60, 900))
        ids = np.minimum(np.searchsorted(cdf, rng.random(n)), _VOCAB_WORDS - 1)
        sentences = np.array_split(words[ids], max(1, n // 15))
        text = ". ".join(" ".join(s).capitalize() for s in sentences) + "."
        text = f"Document {key}. {text}"
        produced += len(text)
        yield key, text
        key += 1


def builder_class(total_mb: float):
    import tensorflow_datasets as tfds

    class StreamingCorpus(tfds.core.GeneratorBasedBuilder):
        """Generated text in a ``text`` feature (as C4's)."""

        VERSION = tfds.core.Version("1.0.0")
        code_path = pathlib.Path(__file__)

        def _info(self) -> tfds.core.DatasetInfo:
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(total_mb, 1),
                "validation": self._generate_examples(2.0, 2, first_id=10**9),
            }

        def _generate_examples(self, mb: float, seed: int, first_id: int = 0):
            for key, text in generate_documents(mb, seed, first_id):
                yield key, {"text": text}

    return StreamingCorpus


def prepare(data_dir: pathlib.Path, total_mb: float) -> None:
    import tensorflow_datasets as tfds

    builder = builder_class(total_mb)(data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        print(f"using the prepared copy in {builder.data_dir}", flush=True)
        return
    start = time.time()
    shards = max(1, int(total_mb * 1e6 / 2500 / _DOCS_PER_SHARD_HINT))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
    print(f"prepared {builder.data_dir} in {time.time() - start:.0f} s", flush=True)


def rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from configs.base import data_config
    from train import data as data_lib

    cfg = data_config()
    cfg.source = "tfds"
    cfg.tfds_name = "streaming_corpus"
    cfg.data_dir = str(args.data_dir)
    cfg.tfds_eval_split = "validation"
    cfg.vocab_size = args.vocab_size
    cfg.cache_dir = str(args.data_dir / "cache")
    cfg.read_threads = args.read_threads

    def build():
        return data_lib.build_datasets(
            cfg, seq_len=args.seq_len, global_batch_size=args.batch_size, seed=0
        )

    rss = {"start": rss_mib()}
    start = time.time()
    datasets = build()
    rss["built"] = rss_mib()
    print(datasets.description, flush=True)
    print(f"built in {time.time() - start:.1f} s, RSS {rss['built']:.0f} MiB", flush=True)
    report = sorted({1, *np.unique(np.geomspace(1, args.steps, 8).astype(int)), args.steps})
    checkpoint, reference, tokens = None, [], 0
    start = time.time()
    for step in range(1, args.steps + 1):
        batch = next(datasets.train)
        tokens += batch["inputs"].size
        if step == args.resume_at:
            checkpoint = json.dumps(datasets.train.get_state())
        if args.resume_at < step <= args.resume_at + args.resume_steps:
            reference.append(batch["inputs"])
        if step in report:
            rss[step] = rss_mib()
            print(
                f"step {step:6d}: RSS {rss[step]:7.1f} MiB, {tokens / 1e6:8.2f} M tokens, "
                f"{tokens / (time.time() - start):,.0f} tokens/s",
                flush=True,
            )
    restored = build()
    restored.train.set_state(json.loads(checkpoint))
    exact = all(np.array_equal(next(restored.train)["inputs"], ref) for ref in reference)
    print(
        f"resume at step {args.resume_at}: the next {len(reference)} batches "
        f"{'equal' if exact else 'DIFFER FROM'} the uninterrupted run's; state {checkpoint}",
        flush=True,
    )
    return {"rss_mib": rss, "resume_exact": exact, "tokens": tokens}


def _rss_of(pid: int) -> float | None:
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _losses(workdir: pathlib.Path) -> dict[int, float]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run_trainer(args: argparse.Namespace, workdir: pathlib.Path, extra: list[str]) -> list:
    """Runs ``python -m train`` on the copy, sampling its RSS; returns (step, RSS MiB) pairs."""
    root = pathlib.Path(__file__).resolve().parents[1]
    command = [
        sys.executable,
        "-m",
        "train",
        "--config",
        str(root / "configs" / "llama_tiny.py"),
        "--workdir",
        str(workdir),
        "--config.data.source=tfds",
        "--config.data.tfds_name=streaming_corpus",
        f"--config.data.data_dir={args.data_dir}",
        "--config.data.tfds_eval_split=validation",
        f"--config.data.cache_dir={args.data_dir / 'cache'}",
        f"--config.data.read_threads={args.read_threads}",
        f"--config.num_steps={args.train_steps}",
        "--config.eval_every=100",
        "--config.checkpoint_every=1000000",
        *extra,
    ]
    child = subprocess.Popen(
        command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    samples = []  # (last logged step, RSS MiB)
    while child.poll() is None:
        rss = _rss_of(child.pid)
        steps = _losses(workdir)
        if rss is not None:
            samples.append((max(steps, default=0), rss))
        time.sleep(1.0)
    if child.returncode:
        raise SystemExit(f"trainer failed ({child.returncode}): {' '.join(command)}")
    return samples


def train(args: argparse.Namespace) -> None:
    """A llama_tiny pre-training run reading the copy (RSS per logged step), and the same run
    stopped at ``--train_resume_at`` and resumed: its losses must equal the first run's."""
    base = args.data_dir / "runs"
    straight, interrupted = base / "straight", base / "interrupted"
    for path in (straight, interrupted):
        if path.exists():
            raise SystemExit(f"{path} exists: remove it first")
    samples = run_trainer(args, straight, [])
    by_step: dict[int, float] = {}
    for step, rss in samples:
        by_step[step] = max(rss, by_step.get(step, 0.0))
    print("trainer RSS (max while at each logged step):", flush=True)
    for step in sorted(by_step):
        print(f"  step {step:5d}: {by_step[step]:7.1f} MiB", flush=True)
    run_trainer(args, interrupted, [f"--config.run_steps={args.train_resume_at}"])
    run_trainer(args, interrupted, [])
    a, b = _losses(straight), _losses(interrupted)
    after = [s for s in sorted(a) if s > args.train_resume_at]
    diff = max(abs(a[s] - b[s]) for s in after)
    print(
        f"resumed at step {args.train_resume_at}: losses at steps {after[0]}..{after[-1]} "
        f"differ from the uninterrupted run's by at most {diff:.3g}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", type=pathlib.Path, required=True)
    parser.add_argument("--mb", type=float, default=400.0, help="train split size to generate")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--resume_at", type=int, default=500)
    parser.add_argument("--resume_steps", type=int, default=20)
    parser.add_argument("--train_steps", type=int, default=0, help="also pre-train llama_tiny")
    parser.add_argument("--train_resume_at", type=int, default=60)
    parser.add_argument("--skip_stream", action="store_true", help="only the trainer runs")
    parser.add_argument("--measure", action="store_true", help="(internal) the measuring child")
    args = parser.parse_args()
    if args.measure:
        builder_class(args.mb)  # Registers the builder's name in this process.
        result = measure(args)
        if not result["resume_exact"]:
            sys.exit(1)
        return
    prepare(args.data_dir, args.mb)
    if not args.skip_stream:
        # Measure in a fresh process, so preparation's memory is not counted.
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure"], check=True)
    if args.train_steps:
        train(args)


if __name__ == "__main__":
    main()
