"""The pre-training schema: every key ``python -m train`` reads, with its default.

Defaults live here and nowhere else (the trainer reads each key as given; a key it reads but
this file does not declare cannot exist). Every config file defines ``get_config()``; any
field can be overridden on the command line, e.g. ``python -m train --config
configs/llama_60m.py --config.optimizer.subspace.rank=256``. Overriding a key that does not
exist is an error.

The blocks:

* ``model``: the LLaMA's shape and numerics (``train.model.LlamaConfig``); shapes come from
  ``configs/models.py``.
* ``data``: where the text comes from and how it is tokenized (``train/data.py``).
* ``optimizer``: one transformation named by ``optimizer.name``, with the schedule, weight
  decay and clip every name shares, then one sub-block per family, each read and checked only
  by the builders that use it (``train/optimizer.py``):

  ==============  ===============================================  =======================
  name            what it is                                       sub-blocks it reads
  ==============  ===============================================  =======================
  adamw           full-parameter ``inner`` (AdamW, 8-bit, MSGD)    inner
  galore          GaLore: SVD-family projector                     inner, subspace
  golore          GoLore: random (Stiefel) projector               inner, subspace
  hybrid          GoLore@x%: GaLore, then GoLore for the last x    inner, subspace
  importance      importance-sampled SVD projector                 inner, subspace
  gasare, gosare  sparse subspaces (GaSare / GoSare)               inner, subspace, sparse
  osd             Online Subspace Descent                          inner, subspace, online
  optax_galore    ``optax.contrib.galore``, to measure beside ours inner, subspace
  ==============  ===============================================  =======================

* ``step``: how the train step applies the optimizer: layer by layer inside the backward pass,
  through ReLoRA-like adapters, with stochastic rounding of bf16 params.
* ``mesh``, the loop (steps, logging, checkpoints), multi-process and fault keys at the top.
"""

from __future__ import annotations

import ml_collections

from configs.models import MODELS


def inner_config() -> ml_collections.ConfigDict:
    """``optimizer.inner``: the optimizer run inside the subspace (and alone for name=adamw)."""
    return ml_collections.ConfigDict(
        {
            # adamw | adamw8bit (8-bit block-wise moments) | msgd (SGD with momentum).
            "name": "adamw",
            "b1": 0.9,  # adamw*: optax convention (the paper's 0.1)
            "b2": 0.999,
            "eps": 1e-8,
            "momentum": 0.9,  # msgd, optax convention
        }
    )


def subspace_config() -> ml_collections.ConfigDict:
    """``optimizer.subspace``: the low-rank projection of every subspace optimizer."""
    return ml_collections.ConfigDict(
        {
            # GaLore's projector (and the hybrid's before the switch): svd (the reference),
            # gram_eigh (same subspace, 8-16x faster on an H100) or subspace_iteration.
            "projector": "gram_eigh",
            "rank": 128,
            "update_every": 200,  # refresh the subspace every this many steps (tau)
            "scale": 1.0,  # alpha: the projected-back update is multiplied by it
            "golore_fraction": 0.2,  # hybrid: random projector for the last 20% of steps
            # What a refresh does to Adam's moments: rotate the first moment into the new
            # basis (momentum_projection) and keep / reset / project the second.
            "momentum_projection": False,
            "second_moment": "keep",
            "seed": 0,  # PRNG seed of the random projector (and of the sparse supports)
            # Which side of a matrix is projected: gradient (GaLore's rule, the smaller side) |
            # state (fewer basis + moment floats: optax.contrib.galore's side with Adam) |
            # left | right. name=optax_galore always uses optax's own rule and SVD.
            "side": "gradient",
            # Refresh same-shape matrices as one stacked batch (faster; the stack is a copy of
            # those gradients: +30 GiB at 7B). False decomposes each matrix on its own.
            "batch_refresh": True,
            # At most this many matrices per stacked call, one call after another (0: no
            # limit): bounds the stack and the decomposition workspace, same result.
            "refresh_batch_size": 0,
            # Operand dtype of the per-step projection matmuls P^T G and P N ("bfloat16":
            # cheaper on GPUs, fp32 accumulation; moments and bases stay fp32).
            "projection_dtype": "float32",
            # Storage dtype of the bases P / Q ("bfloat16" halves them; "int4": 4-bit codes
            # two a byte with an fp32 scale per 64 rows of a column, 1/7 of fp32; decomposed
            # in fp32, decoded for each use: golore_jax.Execution.basis_dtype).
            "basis_dtype": "float32",
            # Lazy, layer-adaptive refresh (galore, hybrid, importance; golore_jax.LazyRefresh):
            # at a scheduled refresh a matrix that is not due skips its decomposition. A
            # decomposed matrix whose new basis overlaps the previous one
            # (||P_old^T P_new||_F^2 / r, the mean squared cosine of the principal angles) by
            # >= lazy_threshold lazy_patience times in a row has its interval (in refreshes)
            # multiplied by lazy_growth, up to lazy_max_period (0: no cap). 0.0: off (every
            # matrix at every refresh); 2 never triggers (> 1 with float bases). The hybrid's
            # random phase keeps its schedule. metrics.jsonl then logs refreshes_done /
            # refreshes_scheduled.
            "lazy_threshold": 0.0,
            "lazy_patience": 2,
            "lazy_growth": 2,
            "lazy_max_period": 0,
        }
    )


def optimizer_config() -> ml_collections.ConfigDict:
    """The optimizer block: ``name``, what every name shares, then the families' sub-blocks."""
    return ml_collections.ConfigDict(
        {
            # adamw | galore | golore | hybrid | importance | gasare | gosare | osd |
            # optax_galore (train.optimizer.OPTIMIZERS; the table in this module's docstring).
            "name": "hybrid",
            "learning_rate": 1e-3,
            "warmup_steps": 1000,  # linear warmup from 0, then cosine decay
            "min_lr_ratio": 0.1,  # cosine decays to learning_rate * min_lr_ratio
            "weight_decay": 0.0,  # decoupled, on matrices only (not norms)
            "grad_clip": 1.0,  # global-norm clip; 0 disables
            "inner": inner_config(),
            "subspace": subspace_config(),
            # osd: the learning rate of the projector's own AdamW (the OSD authors' 1/200).
            "online": ml_collections.ConfigDict({"projector_learning_rate": 0.005}),
            # gasare / gosare: the fraction of each matrix's entries kept; None keeps
            # rank * max(m, n), as many values as GaLore's rank-r moments hold.
            "sparse": ml_collections.ConfigDict(
                {"density": ml_collections.FieldReference(None, field_type=float)}
            ),
        }
    )


def step_config() -> ml_collections.ConfigDict:
    """``step``: how the train step applies the optimizer (``train/main.py``)."""
    return ml_collections.ConfigDict(
        {
            # Update each decoder layer inside the backward pass (train/layerwise.py): the
            # gradients of all layers never exist at once. Needs model.scan_layers=True and
            # optimizer.grad_clip=0 (a global-norm clip needs them all); layer_grad_clip clips
            # each layer's gradient (and the embeddings/norm/head's, as one group) by its own
            # norm.
            "layerwise": False,
            "layer_grad_clip": 0.0,
            # Stacked layers (model.scan_layers=True) with the full-gradient step: a subspace
            # optimizer runs per layer, this many layers at a time (vmapped, their refreshes
            # in one batched decomposition; golore_jax.layerwise). 1: one layer after another,
            # the least memory; num_layers: the refresh as fast as unstacked layers, but every
            # step holds all layers' update temporaries (LLaMA-1B: 1.6 s vs 4.9 s, +11 GiB).
            "layers_per_call": 1,
            # ReLoRA-like path (train/relora.py): layers run as W0 + P A, backward forms only
            # A's low-rank gradient between refreshes. Needs a basis projector,
            # optimizer.grad_clip=0 and optimizer.weight_decay=0.
            "relora": False,
            # With model.param_dtype="bfloat16": add each update in fp32 and round the params
            # to bf16 stochastically (unbiased; golore_jax.apply_updates_stochastic), keyed by
            # seed and step.
            "stochastic_rounding": False,
        }
    )


def data_config() -> ml_collections.ConfigDict:
    """``data``: the corpus and tokenizer (``train/data.py``), every field with its default."""
    return ml_collections.ConfigDict(
        {
            # 'default' (offline GCIDE dictionary corpus), 'files' (paths), 'tfds' (e.g. C4,
            # streamed) or 'sampled' (an endless trigram source fitted on GCIDE, with a known
            # loss floor: train/sampled.py).
            "source": "default",
            # Files or directories of .txt / .jsonl / .parquet (source='files').
            "paths": [],
            # JSON field / parquet column / TFDS feature holding the text.
            "text_field": "text",
            # .txt handling: 'file' (one document per file) or 'blank_lines' (per paragraph).
            "txt_split": "file",
            # source='files': stream .jsonl/.txt documents from disk through a byte-offset
            # index (as TFDS copies are streamed) instead of caching their tokens.
            "stream_files": False,
            # TFDS dataset, split and prepared data directory (source='tfds'). T5 / seqio /
            # MaxText copies of C4 are 'c4/en:3.0.1'; plain 'c4/en' finds only 3.1.0.
            "tfds_name": "c4/en",
            "tfds_split": "train",
            "data_dir": ml_collections.FieldReference(None, field_type=str),
            # Held-out TFDS split (e.g. 'validation'); None holds out documents of tfds_split
            # by hash (eval_fraction), which scans the split from its start.
            "tfds_eval_split": ml_collections.FieldReference(None, field_type=str),
            # Streaming: threads reading and tokenizing documents, and documents shuffled
            # together within a window for TFRecord copies (ArrayRecord: whole-split shuffle).
            "read_threads": 4,
            "shuffle_window": 4096,
            # 'bpe' trains a byte-level BPE on the corpus; or a tokenizer.json / .model path.
            "tokenizer": "bpe",
            "vocab_size": 8192,
            # Megabytes of corpus text the BPE trainer reads (keeps training to seconds).
            "tokenizer_train_mb": 8.0,
            # End-of-sequence token of a user tokenizer.json (None: detect a usual one).
            "eos_token": ml_collections.FieldReference(None, field_type=str),
            # Fraction of documents held out for evaluation.
            "eval_fraction": 0.01,
            # Cache root for tokenizers and token streams (None: ~/.cache/golore_jax).
            "cache_dir": ml_collections.FieldReference(None, field_type=str),
            # Cached sources: read at most this many megabytes of corpus text (None: all of it).
            "max_corpus_mb": ml_collections.FieldReference(None, field_type=float),
            # source='sampled' (train/sampled.py): rows sampled on the fly from a trigram
            # source fitted on the default corpus; a two-token context seen fewer than this
            # many times is pruned (its bigram line is used).
            "ngram_min_count": 4,
        }
    )


def model_config(
    hidden: int, intermediate: int, heads: int, layers: int, vocab: int
) -> ml_collections.ConfigDict:
    """``model``: a LLaMA's shape and numerics (``train.model.LlamaConfig``)."""
    return ml_collections.ConfigDict(
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
            # "int8": the stacked layers' matrices stored as int8 with one fp32 scale per
            # output channel, decoded to param_dtype one layer at a time, updated with
            # stochastic rounding (train/weight_storage.py). Needs scan_layers=True and
            # step.layerwise=True; with param_dtype="bfloat16" step.stochastic_rounding=True.
            "weight_storage": "float",
        }
    )


def llama_config(
    hidden: int, intermediate: int, heads: int, layers: int, vocab: int = 32000
) -> ml_collections.ConfigDict:
    """A full training config for a LLaMA of the given shape (GaLore's configs/llama_*.json)."""
    config = ml_collections.ConfigDict()
    config.model = model_config(hidden, intermediate, heads, layers, vocab)
    config.data = data_config()
    config.data.vocab_size = vocab
    config.optimizer = optimizer_config()
    config.step = step_config()
    # Mechanism metrics (train/mechanism.py), off by default. grad_noise_every: every this many
    # steps (a multiple of log_every) the gradient is taken as the mean of the two half-batches'
    # and metrics.jsonl gets each matrix's noise and signal (unbiased estimates of ||g - G||^2
    # and ||G||^2); subspace_overlap: at each subspace refresh, ||P_old^T P_new||_F^2 / r per
    # matrix. Both need the plain full-gradient step (not step.layerwise / step.relora).
    config.mechanism = ml_collections.ConfigDict({"grad_noise_every": 0, "subspace_overlap": False})
    # Mesh axis sizes; -1 takes all remaining devices. data x fsdp x tensor = device count.
    # axis_types: 'auto' (XLA propagates shardings from the params', state's and batch's) or
    # 'explicit' (jax.sharding.AxisType.Explicit: shardings are part of the arrays' types;
    # the model's forward/backward runs inside jax.sharding.auto_axes; the full-gradient step
    # only: not step.layerwise, step.relora or int8 weight storage).
    # typed_update (explicit only): False runs the guarded optimizer update inside auto_axes
    # between the params' and state's explicit types (XLA places its inside, as on Auto
    # axes); True keeps every operation of it typed (the library's Explicit-axis code; JAX
    # lowers a sharding constraint after each: LLaMA-1B's step has 13,211 instead of 1,398 and
    # compiled 1.05x-1.20x auto's time on one H200, BENCHMARKS section 11).
    config.mesh = ml_collections.ConfigDict(
        {"data": -1, "fsdp": 1, "tensor": 1, "axis_types": "auto", "typed_update": False}
    )
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
    # What the terminal shows of the libraries' log records (orbax, absl, jax): 'warning'
    # (their warnings and errors), 'info' / 'debug' (all of them) or 'error'. The trainer's own
    # lines and the progress bar always show; every INFO record also goes to WORKDIR/train.log
    # (train/console.py). Command line only: a program called as a library keeps its logging.
    config.log_level = "warning"
    return config


def model_named(name: str) -> ml_collections.ConfigDict:
    """The training config of ``configs.models.MODELS[name]``, its GaLore rank included."""
    shape = MODELS[name]
    config = llama_config(shape.hidden, shape.intermediate, shape.heads, shape.layers, shape.vocab)
    config.optimizer.subspace.rank = shape.rank
    return config
