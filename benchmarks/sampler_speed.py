"""The sampled corpus's cost on the host (issue 32): build / load time and tokens per second
of the trigram sampler alone (train/sampled.py), one thread, no training.

    python -m benchmarks.sampler_speed --cache-dir .h7/cache [--rows 128,512] [--repeats 5]

Builds (or loads) the source of configs/figure3_sampled.py's data block (GCIDE, 32k BPE),
then times ``sample_rows`` for batches of ``rows`` rows of 257 tokens (one host's share of a
global batch of that many rows). Prints wall and CPU (process) seconds per batch; tokens/s
counts the 256 sampled tokens of each row. Compare with the train step's tokens/s (BENCHMARKS.md:
LLaMA-60M about 0.8-1.1M tokens/s on one H100): the pipeline samples in a background thread.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from configs import figure3_sampled
from train import data as data_lib
from train import sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rows", default="128,512")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = figure3_sampled.get_config()
    config.data.cache_dir = args.cache_dir
    cfg = data_lib.resolve_config(config.data)
    spec = data_lib.corpus_spec(cfg)
    tok = data_lib.build_tokenizer(cfg, spec)
    train, held = data_lib.load_or_tokenize(cfg, spec, tok)
    start = time.perf_counter()
    source = sampled.load_or_fit(
        data_lib.cache_root(cfg),
        data_lib._stream_key(cfg, spec, tok),
        lambda: np.concatenate([np.asarray(train), np.asarray(held)]),
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
        min_count=cfg.ngram_min_count,
    )
    result = {"build_or_load_s": time.perf_counter() - start, "rows": {}}
    length = config.seq_len + 1
    for n in (int(r) for r in args.rows.split(",")):
        walls, cpus = [], []
        for rep in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            source.sample_rows(0, sampled.TRAIN_STREAM, np.arange(rep * n, (rep + 1) * n), length)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        tokens = n * (length - 1)
        result["rows"][n] = {
            "wall_s": min(walls),
            "cpu_s": min(cpus),
            "tokens_per_s_wall": tokens / min(walls),
            "tokens_per_cpu_s": tokens / min(cpus),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
