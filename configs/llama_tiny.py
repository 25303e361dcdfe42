"""A small LLaMA that trains on a laptop CPU in a few minutes (the README's main command).

GoLore@20% over 300 steps on the offline default corpus with an 8k BPE vocabulary.
"""

from configs.base import llama_config


def get_config():
    config = llama_config(hidden=256, intermediate=688, heads=4, layers=4, vocab=8192)
    config.model.max_seq_len = 128
    config.model.dtype = "float32"  # bf16 matmuls are slow on most CPUs
    config.seq_len = 128
    config.batch_size = 16
    config.num_steps = 300
    config.log_every = 10
    config.eval_every = 100
    config.eval_batches = 4
    config.checkpoint_every = 100
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.rank = 64
    config.optimizer.update_every = 50
    config.optimizer.scale = 1.0
    return config
