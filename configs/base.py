"""Shared defaults for the LLaMA pre-training configs (ml_collections, flax-examples style).

Every config file defines ``get_config()``; any field can be overridden on the command line,
e.g. ``python -m train --config configs/llama_60m.py --config.optimizer.rank=256``. Overriding
a key that does not exist is an error.
"""

from __future__ import annotations

import ml_collections

from train.data import default_data_config


def optimizer_config() -> ml_collections.ConfigDict:
    """The optimizer block: adamw | galore | golore | hybrid | ..., AdamW or MSGD inside
    (``train.optimizer.OPTIMIZERS``; optax_galore is ``optax.contrib.galore``)."""
    return ml_collections.ConfigDict(
        {
            # adamw (full-parameter) | galore (SVD) | golore (random) | hybrid (GoLore@x%).
            "name": "hybrid",
            # adamw | adamw8bit (8-bit block-wise moments) | msgd: the optimizer run inside the
            # subspace (and for name=adamw, alone).
            "inner": "adamw",
            "learning_rate": 1e-3,
            "warmup_steps": 1000,
            "min_lr_ratio": 0.1,  # cosine decays to learning_rate * min_lr_ratio
            "weight_decay": 0.0,
            "grad_clip": 1.0,  # global-norm clip; 0 disables
            "b1": 0.9,  # optax convention (the paper's 0.1)
            "b2": 0.999,
            "eps": 1e-8,
            "momentum": 0.9,  # for inner=msgd, optax convention
            # GaLore's projector (and the hybrid's before the switch): svd (the reference),
            # gram_eigh (same subspace, 8-16x faster on an H100) or subspace_iteration.
            "projector": "gram_eigh",
            "rank": 128,
            "update_every": 200,
            "scale": 1.0,
            "golore_fraction": 0.2,  # hybrid: random projector for the last 20% of steps
            "momentum_projection": False,
            "second_moment": "keep",
            "seed": 0,  # PRNG seed of the random projector
            # ReLoRA-like path (train/relora.py): layers run as W0 + P A, backward forms only
            # A's low-rank gradient between refreshes. Needs grad_clip=0 and weight_decay=0.
            "relora": False,
            # Refresh same-shape matrices as one stacked batch (faster; the stack is a copy of
            # those gradients: +30 GiB at 7B). False decomposes each matrix on its own.
            "batch_refresh": True,
            # At most this many matrices per stacked call, one call after another (0: no
            # limit): bounds the stack and the decomposition workspace, same result.
            "refresh_batch_size": 0,
            # Operand dtype of the per-step projection matmuls P^T G and P N ("bfloat16":
            # cheaper on GPUs, fp32 accumulation; moments and bases stay fp32).
            "projection_dtype": "float32",
            # Storage dtype of the bases P / Q ("bfloat16" halves them; decomposed in fp32).
            "basis_dtype": "float32",
            # With model.param_dtype="bfloat16": add each update in fp32 and round the params
            # to bf16 stochastically (unbiased; golore_jax.precision), keyed by seed and step.
            "stochastic_rounding": False,
            # Update each decoder layer inside the backward pass (train/layerwise.py): the
            # gradients of all layers never exist at once. Needs model.scan_layers=True and
            # grad_clip=0 (a global-norm clip needs them all); layer_grad_clip clips each
            # layer's gradient (and the embeddings/norm/head's, as one group) by its own norm.
            "layerwise": False,
            "layer_grad_clip": 0.0,
            # Which side of a matrix is projected: gradient (GaLore's rule, the smaller side) |
            # state (fewer basis + moment floats: optax.contrib.galore's side with Adam) |
            # left | right. name=optax_galore always uses optax's own rule and SVD.
            "side": "gradient",
        }
    )


def llama_config(
    hidden: int, intermediate: int, heads: int, layers: int, vocab: int = 32000
) -> ml_collections.ConfigDict:
    """A full training config for a LLaMA of the given shape (GaLore's configs/llama_*.json)."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": intermediate,
            "num_heads": heads,
            "num_layers": layers,
            "num_kv_heads": ml_collections.FieldReference(None, field_type=int),
            "max_seq_len": 256,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat": False,
            "scan_layers": False,
            "attention": "auto",  # cudnn flash attention on NVIDIA GPUs, else einsum
        }
    )
    config.data = default_data_config()
    config.data.vocab_size = vocab
    config.optimizer = optimizer_config()
    # Mesh axis sizes; -1 takes all remaining devices. data x fsdp x tensor = device count.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.seq_len = 256
    config.batch_size = 128  # global, over all devices and hosts
    config.num_steps = 10_000
    config.log_every = 50
    config.eval_every = 1000
    config.eval_batches = 8
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.seed = 0  # init and data order
    # Several processes (one per host): jax.distributed.initialize (train/distributed.py).
    config.distributed = False
    # Process 0's "host:port"; "" lets JAX detect the cluster (SLURM, Open MPI, TPU VM, GKE).
    config.coordinator_address = ""
    # Number of processes and this one's index in [0, num_processes) (None: detect).
    config.num_processes = ml_collections.FieldReference(None, field_type=int)
    config.process_id = ml_collections.FieldReference(None, field_type=int)
    # A process that stops heartbeating for this long is dead: the others then exit with an
    # error instead of waiting for it. Connecting to the coordinator gives up after the other.
    config.heartbeat_timeout_s = 100
    config.initialization_timeout_s = 300
    # JAX's persistent compilation cache ("" = off): a restarted or resumed run reuses the
    # compiled steps, e.g. "~/.cache/golore_jax/xla". Process-wide (set before compiling).
    config.compilation_cache_dir = ""
    # Steps to run in this invocation before saving and exiting (None: up to num_steps).
    config.run_steps = ml_collections.FieldReference(None, field_type=int)
    # Non-finite loss or gradients: 'skip' the step (counted, up to max_skipped) or 'stop'.
    config.nonfinite = "skip"
    config.max_skipped = 20
    return config
