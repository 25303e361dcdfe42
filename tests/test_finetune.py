"""Fine-tuning entry point (train/finetune.py) on tiny synthetic BoolQ / WinoGrande files."""

from __future__ import annotations

import json
import pathlib
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.finetune_boolq import get_config
from train import finetune as ft_lib
from train import model as model_lib
from train import tokenizer as tokenizer_lib

FILLER = (
    "river mountain blue green quiet house garden window morning evening yellow old small"
).split()


def write_light_boolq(path: pathlib.Path, n: int, seed: int) -> pathlib.Path:
    """Balanced yes/no items: the answer is whether the passage says the light is on or off."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            on = i % 2 == 0
            before = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6)))
            after = " ".join(rng.choice(FILLER) for _ in range(rng.randint(1, 4)))
            passage = f"{before} the light is {'on' if on else 'off'} {after}."
            record = {"question": "is the light on", "passage": passage, "answer": on}
            f.write(json.dumps(record) + "\n")
    return path


def tiny_config(tmp_path: pathlib.Path, name: str) -> ml_collections.ConfigDict:
    """The BoolQ recipe shrunk for CPU: 2-layer hidden-64 LLaMA (MLP 64), rank 16, AdamW, lr 1e-2.

    Overrides the recipe's msgd / rank 1024 / lr 1e-4 / batch 1 / seq 2048, which are for a 7B
    model and thousands of steps.
    """
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    config = get_config()
    config.data.train_file = str(write_light_boolq(data / "train.jsonl", 200, seed=0))
    config.data.eval_file = str(write_light_boolq(data / "eval.jsonl", 40, seed=1))
    config.model.hidden_size = 64
    config.model.intermediate_size = 64  # one matrix shape fewer: faster compile
    config.model.num_heads = 4
    config.model.num_layers = 2
    config.model.max_seq_len = 48
    config.model.dtype = "float32"
    config.init.bpe_vocab_size = 300
    config.seq_len = 48
    config.batch_size = 8
    config.num_steps = 40
    config.log_every = 10
    config.eval_every = 40
    config.eval_batch_size = 80  # the whole eval set (40 items x 2 candidates) in one batch
    opt = config.optimizer
    opt.name = name
    opt.inner = "adamw"
    opt.learning_rate = 1e-2
    opt.rank = 16
    opt.update_every = 10
    opt.scale = 1.0
    opt.golore_fraction = 0.5  # hybrid: GaLore for steps 0-19, GoLore for 20-39
    return config


@pytest.mark.parametrize("name", ["golore", "hybrid"])
def test_boolq_accuracy_improves(tmp_path: pathlib.Path, name: str) -> None:
    """Untrained: 0.5 (one answer for every item); after 40 steps: 1.0 (seen: golore 0.5 -> 1.0)."""
    config = tiny_config(tmp_path, name)
    result = ft_lib.finetune(config, tmp_path / "work")
    assert result["first_eval_accuracy"] <= 0.6
    assert result["eval_accuracy"] >= 0.85, result
    records = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").open()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    accuracies = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert accuracies[0] == result["first_eval_accuracy"]
    assert accuracies[-1] == result["eval_accuracy"]


def _tokenizer() -> tokenizer_lib.HFTokenizer:
    texts = [f"the light is {w} {' '.join(FILLER)} Question: Answer: yes no" for w in ("on", "off")]
    return tokenizer_lib.train_bpe(texts * 20, 300)


def test_answer_only_loss_mask() -> None:
    """Prompt and padding positions get zero weight; the answer tokens decode to ' yes'."""
    tok = _tokenizer()
    ex = ft_lib.boolq_example(
        {"question": "is it on", "passage": "the light is on", "answer": True}
    )
    assert ex.label == 0 and ex.continuations == (" yes", " no")
    assert ex.contexts[0] == "the light is on\nQuestion: is it on?\nAnswer:"
    bos = ft_lib.bos_id(tok)
    x, y, w = ft_lib.encode_choice(tok, ex.contexts[0], " yes", 32, bos=bos, pad=tok.eos_id)
    answer = np.flatnonzero(w)
    assert tok.decode(y[answer].tolist()) == " yes"
    n_prompt = len(tok.encode_batch([ex.contexts[0]])[0])
    assert answer[0] == n_prompt  # target at position n_prompt is the first answer token
    assert w[:n_prompt].sum() == 0 and w[answer[-1] + 1 :].sum() == 0
    assert x[0] == bos and np.array_equal(x[1 : answer[-1] + 1], y[: answer[-1]])

    # The loss does not see logits at prompt positions.
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 32, tok.vocab_size)), jnp.float32)
    noisy = logits.at[0, :n_prompt].add(5.0 * rng.normal(size=(n_prompt, tok.vocab_size)))
    args = (jnp.asarray(y[None]), jnp.asarray(w[None]))
    np.testing.assert_allclose(
        ft_lib.answer_loss(logits, *args), ft_lib.answer_loss(noisy, *args), rtol=1e-6
    )

    # Left truncation drops the start of the passage, keeps BOS and the whole answer.
    long_ctx = "the light is " + " ".join(FILLER * 4) + "\nAnswer:"
    x, y, w = ft_lib.encode_choice(tok, long_ctx, " yes", 16, bos=bos, pad=tok.eos_id)
    assert x[0] == bos and w[-1] == 1.0 and tok.decode(y[w > 0].tolist()) == " yes"
    text = tok.decode([*x[1:].tolist(), int(y[-1])])
    assert text.endswith("\nAnswer: yes") and not text.startswith("the light")


def test_winogrande_scoring(tmp_path: pathlib.Path) -> None:
    """Two-example file: the scores are the summed log-likelihoods of the shared continuation."""
    path = tmp_path / "wino.jsonl"
    records = [
        {
            "sentence": "The trophy did not fit in the suitcase because the _ was too big.",
            "option1": "trophy",
            "option2": "suitcase",
            "answer": "1",
        },
        {
            "sentence": "Sarah lent money to Maria because _ was short of cash.",
            "option1": "Sarah",
            "option2": "Maria",
            "answer": "2",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = ft_lib.load_examples(str(path), "winogrande", "config.data.eval_file")
    assert [ex.label for ex in examples] == [0, 1]
    assert examples[0].contexts == (
        "The trophy did not fit in the suitcase because the trophy",
        "The trophy did not fit in the suitcase because the suitcase",
    )
    assert examples[0].continuations == (" was too big.",) * 2

    tok = tokenizer_lib.train_bpe([r["sentence"] for r in records] * 10, 300)
    seq_len = 32
    encoded = ft_lib.encode_examples(tok, examples, seq_len, correct_only=False)
    assert encoded["inputs"].shape == (4, seq_len)
    assert encoded["example"].tolist() == [0, 0, 1, 1]
    assert encoded["choice"].tolist() == [0, 1, 0, 1]
    for row in range(4):  # every candidate scores exactly its continuation's tokens
        ex = examples[encoded["example"][row]]
        scored = tok.decode(encoded["targets"][row][encoded["weights"][row] > 0].tolist())
        assert scored == ex.continuations[0]

    config = model_lib.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        num_layers=1,
        max_seq_len=seq_len,
        dtype="float32",
    )
    model = model_lib.LlamaForCausalLM(config)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), dummy)["params"])
    logits_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))  # one compile, shape [4, L]

    def score(p, batch):
        logits = logits_fn(p, batch["inputs"])
        return ft_lib.continuation_logprob(logits, batch["targets"], batch["weights"])

    labels = np.asarray([ex.label for ex in examples])
    accuracy, predictions = ft_lib.evaluate(score, params, encoded, labels, batch_size=4)
    # Reference: log p(continuation | context) by hand from the full-sequence log-softmax.
    logp = np.asarray(jax.nn.log_softmax(logits_fn(params, encoded["inputs"])))
    ref = np.zeros(4)
    for row in range(4):
        for t in np.flatnonzero(encoded["weights"][row]):
            ref[row] += float(logp[row, t, encoded["targets"][row, t]])
    expected = ref.reshape(2, 2).argmax(axis=1)
    np.testing.assert_array_equal(predictions, expected)
    assert accuracy == float(np.mean(expected == labels))
    manual = np.asarray(score(params, {k: encoded[k] for k in ("inputs", "targets", "weights")}))
    np.testing.assert_allclose(manual, ref, rtol=1e-4, atol=1e-4)


def test_missing_data_paths_name_the_field(tmp_path: pathlib.Path) -> None:
    config = get_config()
    with pytest.raises(ValueError, match=r"config\.data\.train_file"):
        ft_lib.finetune(config, tmp_path / "work")
    config.data.train_file = str(write_light_boolq(tmp_path / "train.jsonl", 4, seed=0))
    with pytest.raises(ValueError, match=r"config\.data\.eval_file"):
        ft_lib.finetune(config, tmp_path / "work")
    config.data.eval_file = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.eval_file"):
        ft_lib.finetune(config, tmp_path / "work")
    config.data.eval_file = config.data.train_file
    config.init.hf_checkpoint = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=r"config\.init\.hf_checkpoint"):
        ft_lib.finetune(config, tmp_path / "work")


def test_recipe_defaults_and_rank_rule() -> None:
    """The paper's recipe; rank 1024 is clipped to min(m, n) - 1 on small matrices."""
    config = get_config()
    opt = config.optimizer
    assert (opt.name, opt.inner, opt.golore_fraction, opt.rank) == ("hybrid", "msgd", 0.2, 1024)
    assert (opt.update_every, opt.scale, opt.learning_rate) == (500, 4.0, 1e-4)
    assert (config.batch_size, config.seq_len) == (1, 2048)
    rule = ft_lib.subspace_rank_rule(1024)
    assert rule("x", (64, 128)) == 63 and rule("x", (4096, 11008)) == 1024
    assert callable(ft_lib.optimizer_block(opt).rank)
