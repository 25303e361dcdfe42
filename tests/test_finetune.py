"""Fine-tuning entry point (train/finetune.py) on tiny synthetic BoolQ / WinoGrande files."""

from __future__ import annotations

import json
import math
import os
import pathlib
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.finetune_boolq import get_config
from tests.child_env import eight_devices_env
from tests.hf_fixtures import tiny_hf_llama
from train import choice_tasks as tasks_lib
from train import finetune as ft_lib
from train import model as model_lib
from train import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
    config.model.remat = False  # the recipe's remat is for 7B; off compiles faster
    config.init.bpe_vocab_size = 300
    config.seq_len = 48
    config.batch_size = 8
    config.num_steps = 40
    config.log_every = 10
    config.eval_every = 40
    config.eval_batch_size = 80  # the whole eval set (40 items x 2 candidates) in one batch
    opt = config.optimizer
    opt.name = name
    opt.inner.name = "adamw"
    opt.learning_rate = 1e-2
    opt.subspace.rank = 16
    opt.subspace.update_every = 10
    opt.subspace.scale = 1.0
    opt.subspace.golore_fraction = 0.5  # hybrid: GaLore for steps 0-19, GoLore for 20-39
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
    ex = tasks_lib.boolq_example(
        {"question": "is it on", "passage": "the light is on", "answer": True}
    )
    assert ex.label == 0 and ex.continuations == (" yes", " no")
    assert ex.contexts[0] == "the light is on\nQuestion: is it on?\nAnswer:"
    bos = tasks_lib.bos_id(tok)
    x, y, w = tasks_lib.encode_choice(tok, ex.contexts[0], " yes", 32, bos=bos, pad=tok.eos_id)
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
    x, y, w = tasks_lib.encode_choice(tok, long_ctx, " yes", 16, bos=bos, pad=tok.eos_id)
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
    examples = tasks_lib.load_examples(str(path), "winogrande", "config.data.eval_file")
    assert [ex.label for ex in examples] == [0, 1]
    assert examples[0].contexts == (
        "The trophy did not fit in the suitcase because the trophy",
        "The trophy did not fit in the suitcase because the suitcase",
    )
    assert examples[0].continuations == (" was too big.",) * 2

    tok = tokenizer_lib.train_bpe([r["sentence"] for r in records] * 10, 300)
    seq_len = 32
    encoded = tasks_lib.encode_examples(tok, examples, seq_len, correct_only=False)
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
        return tasks_lib.continuation_logprob(logits, batch["targets"], batch["weights"])

    labels = np.asarray([ex.label for ex in examples])
    accuracy, predictions = tasks_lib.evaluate(score, params, encoded, labels, batch_size=4)
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
    sub = opt.subspace
    assert (opt.name, opt.inner.name, sub.golore_fraction, sub.rank) == (
        "hybrid",
        "msgd",
        0.2,
        1024,
    )
    assert (sub.update_every, sub.scale, opt.learning_rate) == (500, 4.0, 1e-4)
    assert (config.batch_size, config.seq_len) == (1, 2048)
    assert config.model.remat and config.model.param_dtype == "float32"
    # Batch 1: tensor parallelism over all devices; the weights come back in HF format.
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, 1, -1)
    assert config.export.enabled and config.export.path is None
    rule = ft_lib.subspace_rank_rule(1024)
    assert rule("x", (64, 128)) == 63 and rule("x", (4096, 11008)) == 1024
    assert callable(ft_lib.optimizer_block(opt).subspace.rank)


# --------------------------------------------------------------------------------------------
# From a Hugging Face checkpoint: load, fine-tune, export; and the same run on a mesh.

HF_VOCAB = 320  # > the 300-id BPE; even, so the vocab splits over tensor=2


def write_hf_checkpoint(path: pathlib.Path, train_file: str) -> pathlib.Path:
    """A random ``transformers.LlamaForCausalLM`` (GQA, untied) saved as safetensors, with a BPE
    ``tokenizer.json`` trained on the task text beside it: nothing is downloaded."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    examples = tasks_lib.load_examples(train_file, "boolq", "train_file")
    tokenizer = tokenizer_lib.train_bpe(tasks_lib.task_texts(examples), 300)
    model = tiny_hf_llama(
        transformers, torch, perturb=0.0, vocab_size=HF_VOCAB, intermediate_size=64
    )
    model.save_pretrained(path)  # safetensors
    tokenizer.save(path / "tokenizer.json")
    assert (path / "model.safetensors").exists()
    return path


def hf_config(tmp_path: pathlib.Path, name: str) -> ml_collections.ConfigDict:
    """:func:`tiny_config` pointed at a checkpoint made by :func:`write_hf_checkpoint`."""
    config = tiny_config(tmp_path, name)
    ckpt = tmp_path / "hf_model"
    if not (ckpt / "model.safetensors").exists():
        write_hf_checkpoint(ckpt, config.data.train_file)
    config.init.hf_checkpoint = str(ckpt)  # its tokenizer.json is found there
    return config


def torch_logits(model_dir: pathlib.Path, inputs: np.ndarray) -> np.ndarray:
    """fp32 logits of the transformers model saved in ``model_dir``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(torch.from_numpy(inputs.astype(np.int64))).logits.float().numpy()


def reference_answer_loss(logits: np.ndarray, encoded: dict[str, np.ndarray]) -> float:
    """Cross-entropy per answer token, by hand (float64)."""
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, encoded["targets"][..., None], axis=-1)[..., 0]
    return float(-(token * encoded["weights"]).sum() / encoded["weights"].sum())


def test_finetune_from_hf_checkpoint_and_export(tmp_path: pathlib.Path) -> None:
    """HF checkpoint -> GoLore@50% fine-tune -> HF export (hybrid: gram_eigh, then random).

    (a) the step-0 eval answer loss equals the transformers model's on the same tokens: the run
    starts from the checkpoint's weights; (b) accuracy and eval answer loss improve; (c) the
    export loads in transformers and gives our fine-tuned model's logits.
    """
    config = hf_config(tmp_path, "hybrid")
    ckpt = pathlib.Path(config.init.hf_checkpoint)
    result = ft_lib.finetune(config, tmp_path / "work")

    tokenizer = tokenizer_lib.load_tokenizer(ckpt / "tokenizer.json")
    examples = tasks_lib.load_examples(config.data.eval_file, "boolq", "eval_file")
    correct = tasks_lib.encode_examples(tokenizer, examples, config.seq_len, correct_only=True)
    start = reference_answer_loss(torch_logits(ckpt, correct["inputs"]), correct)
    assert result["first_eval_answer_loss"] == pytest.approx(start, abs=1e-4)
    assert result["model_config"].num_kv_heads == 2

    # (b) seen: accuracy 0.5 -> 1.0, answer loss 5.86 -> 0.0003 (start matched to 1e-9).
    assert result["eval_accuracy"] >= 0.85, result
    assert result["eval_answer_loss"] < 0.5 * result["first_eval_answer_loss"]

    # (c) the export: config.json + safetensors + the tokenizer; transformers' logits = ours.
    export = tmp_path / "work" / "hf_export"
    assert result["export_dir"] == export
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(export))
    model = model_lib.LlamaForCausalLM(result["model_config"])
    ours = np.asarray(model.apply({"params": result["params"]}, correct["inputs"]))
    theirs = torch_logits(export, correct["inputs"])
    assert float(np.max(np.abs(ours - theirs))) < 1e-4
    assert reference_answer_loss(theirs, correct) == pytest.approx(
        result["eval_answer_loss"], abs=1e-4
    )


# (1, 1, 2): the recipe's layout (tensor parallelism only, the batch not split), on 2 devices
# as the tiny model has 2 key/value heads.
MESHES = {"1": (1, 1, 1), "2x2x2": (2, 2, 2), "1x1x2": (1, 1, 2)}


def multidevice_runs(tmp_path: pathlib.Path) -> dict:
    """Runs in a process with 8 devices: the same HF fine-tune on each of :data:`MESHES`."""
    out: dict = {"devices": jax.device_count(), "losses": {}, "eval": {}, "q_kernel": {}}
    for name, shape in MESHES.items():
        config = hf_config(tmp_path, "golore")
        # The recipe's MSGD inside; refreshes at steps 0 and 2.
        config.optimizer.inner.name = "msgd"
        config.optimizer.learning_rate = 0.05
        config.optimizer.subspace.update_every = 2
        config.num_steps, config.log_every, config.eval_every = 4, 1, 4
        config.data.max_eval_examples, config.eval_batch_size = 8, 16
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
        devices = jax.devices()[: math.prod(shape)]
        result = ft_lib.finetune(config, tmp_path / f"work_{name}", devices=devices)
        records = (tmp_path / f"work_{name}" / "metrics.jsonl").read_text().splitlines()
        out["losses"][name] = [json.loads(r)["train_loss"] for r in records if "train_loss" in r]
        out["eval"][name] = [result["first_eval_answer_loss"], result["eval_answer_loss"]]
        q = result["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
        out["q_kernel"][name] = [str(q.sharding.spec), len(q.sharding.device_set)]
    return out


def test_mesh_runs_match_one_device(tmp_path: pathlib.Path) -> None:
    """8 fake CPU devices: meshes (2,2,2) and (1,1,2) give the 1-device losses; params sharded.

    GoLore's random bases do not depend on the gradient, so every mesh refreshes to the same
    subspace (an SVD-family basis of a low-rank answer-only gradient is arbitrary past its rank
    and would differ in round-off across meshes).
    """
    hf_config(tmp_path, "golore")  # the checkpoint, made here where torch is imported once
    out = subprocess.run(
        [sys.executable, "-m", "tests.test_finetune", str(tmp_path)],
        env=eight_devices_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    reference = result["losses"]["1"]
    assert len(reference) == 4 and reference[-1] < reference[0]
    for name in ("2x2x2", "1x1x2"):
        # fp32 compute; only the order of cross-device reductions differs.
        assert result["losses"][name] == pytest.approx(reference, rel=1e-5), name
        assert result["eval"][name] == pytest.approx(result["eval"]["1"], rel=1e-5), name
    assert result["q_kernel"]["1"] == ["P('fsdp', 'tensor')", 1]
    assert result["q_kernel"]["2x2x2"] == ["P('fsdp', 'tensor')", 8]
    assert result["q_kernel"]["1x1x2"] == ["P('fsdp', 'tensor')", 2]


if __name__ == "__main__":  # the child of test_mesh_runs_match_one_device
    print(json.dumps(multidevice_runs(pathlib.Path(sys.argv[1]))))
