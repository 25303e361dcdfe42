"""A small LLaMA that trains on a laptop CPU in a few minutes (the README's main command).

GoLore@20% over 200 steps on the offline default corpus with a 4k BPE vocabulary (1.8M params).
"""

from configs.base import model_named


def get_config():
    config = model_named("llama_tiny")  # hidden 128, MLP 352, 4 heads, 4 layers, rank 32
    config.model.max_seq_len = 128
    config.model.dtype = "float32"  # bf16 matmuls are slow on most CPUs
    config.seq_len = 128
    config.batch_size = 16
    config.num_steps = 200
    config.log_every = 10
    config.eval_every = 50
    config.eval_batches = 4
    config.checkpoint_every = 100
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.subspace.update_every = 40
    config.optimizer.subspace.scale = 1.0
    return config
