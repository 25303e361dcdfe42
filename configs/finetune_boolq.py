"""The paper's BoolQ fine-tuning recipe for ``python -m train.finetune``.

GoLore@20% (``optimizer.name='hybrid'``: GaLore's SVD-family projector, then random projections
for the last 20% of steps) with MSGD inside the subspace, rank 1024 (clipped per matrix to
``min(m, n) - 1`` on smaller models), subspace refresh every 500 steps, scale 4, learning rate
1e-4, batch size 1, sequences of 2048 tokens. The tests (tests/test_finetune.py) override these
for a tiny random-init model.

Nothing is downloaded: point the config at your own local copies of the weights and the data::

    python -m train.finetune --config configs/finetune_boolq.py --workdir runs/boolq \\
        --config.init.hf_checkpoint=/models/Llama-2-7b-hf \\
        --config.init.tokenizer=/models/Llama-2-7b-hf/tokenizer.json \\
        --config.data.train_file=/data/boolq/train.jsonl \\
        --config.data.eval_file=/data/boolq/validation.jsonl

* ``init.hf_checkpoint``: a Hugging Face LLaMA directory (``config.json`` + ``*.safetensors``).
  Left as None, the model is a random init of ``config.model`` with a byte-level BPE of
  ``init.bpe_vocab_size`` ids trained on the task text (smoke runs only).
* ``init.tokenizer``: its ``tokenizer.json`` or SentencePiece ``tokenizer.model``; if None,
  the checkpoint directory's own ``tokenizer.json`` / ``tokenizer.model`` is used.
* ``data.train_file`` / ``data.eval_file``: jsonl, one ``{"question", "passage", "answer": bool}``
  per line (BoolQ's own format). They default to None; a run without them stops with an error
  naming the field. For WinoGrande set ``--config.data.task=winogrande`` and give files of
  ``{"sentence" with "_", "option1", "option2", "answer": "1"|"2"}``.

* ``optimizer``: the pre-training block of configs/base.py (name, shared keys, ``inner``,
  ``subspace``, ``sparse``, ``online``); fine-tuning has no ``step`` block (the layer-wise,
  ReLoRA-like and stochastic-rounding steps are pre-training's).
* ``mesh``: ``data x fsdp x tensor`` device counts (-1: the rest); the default is tensor
  parallelism over all devices, as the batch of 1 cannot be split.
* ``export``: where and in which dtype the fine-tuned weights are written (Hugging Face format).

Each run appends the train loss, the eval accuracy and the eval answer loss to
``WORKDIR/metrics.jsonl`` and writes the fine-tuned weights to ``WORKDIR/hf_export``.
"""

from __future__ import annotations

import ml_collections

from configs.base import llama_config

BOOLQ_TRAIN_EXAMPLES = 9427


def get_config() -> ml_collections.ConfigDict:
    """BoolQ, GoLore@20% + MSGD, rank 1024, lr 1e-4, batch 1, seq 2048, one epoch."""
    # config.model is only used for a random init (init.hf_checkpoint=None); a checkpoint brings
    # its own shape and takes only dtype / param_dtype / remat / attention from here.
    config = llama_config(hidden=256, intermediate=688, heads=4, layers=4, vocab=1024)
    # The loop's keys (checkpoints, run_steps, the non-finite policy) and the multi-process
    # keys are base.py's; eval_batches and the pre-training corpus are not used here.
    for key in ("data", "eval_batches", "step"):
        del config[key]
    config.model.max_seq_len = 2048
    config.model.remat = True  # 7B at seq 2048: keep only each decoder layer's input
    # Batch size 1 cannot be split over data / fsdp: tensor parallelism over every device
    # spreads the weights, gradients and optimizer state (e.g. a 7B over 2-8 GPUs).
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, -1

    config.init = ml_collections.ConfigDict(
        {
            "hf_checkpoint": ml_collections.FieldReference(None, field_type=str),
            "tokenizer": ml_collections.FieldReference(None, field_type=str),
            "eos_token": ml_collections.FieldReference(None, field_type=str),
            "bpe_vocab_size": 1024,  # random init only
        }
    )
    config.data = ml_collections.ConfigDict(
        {
            "task": "boolq",  # boolq | winogrande
            "train_file": ml_collections.FieldReference(None, field_type=str),
            "eval_file": ml_collections.FieldReference(None, field_type=str),
            "max_train_examples": ml_collections.FieldReference(None, field_type=int),
            "max_eval_examples": ml_collections.FieldReference(None, field_type=int),
        }
    )

    # The fine-tuned weights in Hugging Face format (config.json + model.safetensors + the
    # tokenizer file); path None: WORKDIR/hf_export. float32 keeps the master weights exactly
    # (27 GB for a 7B); bfloat16 halves that.
    config.export = ml_collections.ConfigDict(
        {
            "enabled": True,
            "path": ml_collections.FieldReference(None, field_type=str),
            "dtype": "float32",  # float32 | bfloat16 | float16
        }
    )

    opt = config.optimizer
    opt.name = "hybrid"  # GoLore@20%
    opt.inner.name = "msgd"
    sub = opt.subspace
    # Measured on an H100 (benchmarks/finetune_step.py): the stacked refresh makes the 7B
    # step need 93.5 GiB; one matrix at a time, 63.5 GiB.
    sub.batch_refresh = False
    sub.golore_fraction = 0.2
    sub.rank = 1024
    sub.update_every = 500
    sub.scale = 4.0
    opt.learning_rate = 1e-4
    opt.warmup_steps = 0
    opt.min_lr_ratio = 1.0  # constant learning rate
    opt.weight_decay = 0.0

    config.seq_len = 2048
    config.batch_size = 1
    config.num_steps = BOOLQ_TRAIN_EXAMPLES  # one epoch at batch size 1
    config.log_every = 50
    config.eval_every = 2000
    config.eval_batch_size = 8
    config.seed = 0
    return config
