"""The config schemas (configs/): every key a builder reads is declared there, every declared
optimizer key is read by some builder, each family reads only its own sub-blocks, and no code
restates a default with ``.get(key, default)``."""

from __future__ import annotations

import importlib
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base, models
from train import checkpoint as checkpoint_lib
from train import data as data_lib
from train import finetune as ft_lib
from train import main as main_lib
from train import optimizer as optimizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRETRAINING = sorted(p.stem for p in (ROOT / "configs").glob("llama_*.py"))
PARAMS = {"mlp": {"kernel": jnp.ones((12, 8), jnp.float32)}, "norm": {"scale": jnp.ones(8)}}


class Recorder:
    """A read-only view of a ConfigDict that records the full key of every read.

    A key the config does not declare raises (AttributeError / KeyError, as a ConfigDict does),
    and so does ``.get``: a read with a fallback would hide an undeclared key.
    """

    def __init__(self, config: ml_collections.ConfigDict, reads: set[str], prefix: str = ""):
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def _read(self, key: str):
        value = self._config[key]  # raises on an undeclared key
        path = self._prefix + key
        if isinstance(value, ml_collections.ConfigDict):
            return Recorder(value, self._reads, path + ".")
        self._reads.add(path)
        return value

    def __getattr__(self, key: str):
        if key in ("get", "to_dict", "copy_and_resolve_references", "items", "keys"):
            raise AssertionError(f"{self._prefix}{key}: the builders read keys one by one")
        try:
            return self._read(key)
        except KeyError as e:
            raise AttributeError(f"undeclared key {self._prefix}{key}") from e

    def __getitem__(self, key: str):
        return self._read(key)

    def __setattr__(self, key, value):
        raise AssertionError(f"a builder wrote {self._prefix}{key}")


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def _valid_inners(name: str) -> tuple[str, ...]:
    if name in ("gasare", "gosare", "osd", "optax_galore"):
        return ("adamw", "msgd")
    return optimizer_lib.INNERS


def _optimizer_reads(config: ml_collections.ConfigDict) -> set[str]:
    """The keys under ``optimizer.`` that validate + build_optimizer read for this config."""
    reads: set[str] = set()
    opt = Recorder(config.optimizer, reads, "optimizer.")
    optimizer_lib.validate(opt, num_steps=config.num_steps)
    optimizer_lib.build_optimizer(opt, config.num_steps).init(PARAMS)
    return reads


@pytest.mark.parametrize("module", PRETRAINING)
def test_every_pretraining_config_validates_and_builds(module: str) -> None:
    """Each configs/llama_*.py as shipped, and with every (name, inner), passes the trainer's
    checks and builds an optimizer that initialises, and its data block names the default
    corpus; nothing reads an undeclared key."""
    config = importlib.import_module(f"configs.{module}").get_config()
    config.lock()
    main_lib.validate_config(config)
    checkpoint_lib.fingerprint(config)
    assert "GCIDE" in data_lib.corpus_spec(data_lib.resolve_config(config.data)).description
    for name in optimizer_lib.OPTIMIZERS:
        for inner in _valid_inners(name):
            variant = config.copy_and_resolve_references()
            variant.optimizer.name, variant.optimizer.inner.name = name, inner
            variant.optimizer.subspace.rank = 3  # PARAMS' 12 x 8 kernel
            main_lib.validate_config(variant)
            _optimizer_reads(variant)


def test_finetune_and_quadratic_configs_validate() -> None:
    config = importlib.import_module("configs.finetune_boolq").get_config()
    config.lock()
    ft_lib.validate_config(config)
    opt = ft_lib.optimizer_block(config.optimizer)
    assert callable(opt.subspace.rank)
    optimizer_lib.build_optimizer(opt, config.num_steps).init(PARAMS)
    quadratic = importlib.import_module("configs.quadratic").get_config()
    assert quadratic.family is False and quadratic.sparse_k == 0


def test_every_declared_optimizer_key_is_read_and_each_family_reads_only_its_blocks() -> None:
    """Over all (name, inner) pairs the builders read every key of configs/base.py's optimizer
    block (none is dead), and a name reads the shared keys, ``inner`` and its FAMILY_BLOCKS
    only (a sub-block it does not read cannot change its optimizer)."""
    config = importlib.import_module("configs.llama_tiny").get_config()
    config.optimizer.subspace.rank = 3
    declared = {f"optimizer.{k}" for k in _flat_keys(config.optimizer)}
    shared = {f"optimizer.{k}" for k, v in config.optimizer.items() if not hasattr(v, "items")}
    everything: set[str] = set()
    for name in optimizer_lib.OPTIMIZERS:
        allowed = shared | {k for k in declared if k.startswith("optimizer.inner.")}
        for block in optimizer_lib.FAMILY_BLOCKS[name]:
            allowed |= {k for k in declared if k.startswith(f"optimizer.{block}.")}
        for inner in _valid_inners(name):
            variant = config.copy_and_resolve_references()
            variant.optimizer.name, variant.optimizer.inner.name = name, inner
            if name in ("gasare", "gosare"):
                variant.optimizer.sparse.density = 0.5  # read either way; also build with it
                _optimizer_reads(variant)
                variant.optimizer.sparse.density = None
            reads = _optimizer_reads(variant)
            assert reads <= allowed, (name, inner, sorted(reads - allowed))
            everything |= reads
    assert everything == declared, sorted(declared - everything)


def test_step_block_is_read_by_the_trainer_checks() -> None:
    reads: set[str] = set()
    config = importlib.import_module("configs.llama_tiny").get_config()
    optimizer_lib.validate(config.optimizer, step=Recorder(config.step, reads, "step."))
    optimizer_lib.update_applier(Recorder(config.step, reads, "step."), seed=0)
    assert reads == {f"step.{k}" for k in config.step}


def test_data_schema_is_what_the_data_builder_reads() -> None:
    """configs/base.py's data block declares exactly the fields train/data.py reads; a missing
    or unknown field is an error naming it (defaults are not restated in the code)."""
    declared = base.data_config()
    assert set(declared) == set(data_lib.FIELDS)
    assert data_lib.resolve_config(declared).to_dict() == declared.to_dict()
    partial = declared.to_dict()
    del partial["shuffle_window"]
    with pytest.raises(ValueError, match=r"lacks data\.shuffle_window"):
        data_lib.resolve_config(partial)
    with pytest.raises(ValueError, match=r"Unknown data config field data\.vocab"):
        data_lib.resolve_config({**declared.to_dict(), "vocab": 3})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optimizer.sparse.density": 0.0}, r"config.optimizer.sparse.density=0.0: must be in"),
        ({"optimizer.sparse.density": 1.5}, r"config.optimizer.sparse.density=1.5: must be in"),
        (
            {"optimizer.online.projector_learning_rate": -1.0},
            r"config.optimizer.online.projector_learning_rate=-1.0: must be a finite number > 0",
        ),
        (
            {"optimizer.subspace.projector": "qr"},
            r"config.optimizer.subspace.projector must be one of \('svd', 'gram_eigh', "
            r"'subspace_iteration'\), got 'qr'",
        ),
        ({"optimizer.inner.eps": -1.0}, r"config.optimizer.inner.eps=-1.0: must be a finite"),
        ({"optimizer.subspace.scale": 0.0}, r"config.optimizer.subspace.scale=0.0: must be a"),
    ],
)
def test_sub_block_errors_name_the_full_key(overrides, message) -> None:
    """Bad values in the sub-blocks: one-line ConfigErrors naming the full key, raised by the
    check of the name that reads the sub-block."""
    name = {"sparse": "gasare", "online": "osd"}.get(next(iter(overrides)).split(".")[1], "galore")
    config = importlib.import_module("configs.llama_tiny").get_config()
    config.optimizer.name = name
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[leaf] = value
    with pytest.raises(optimizer_lib.ConfigError, match=message) as raised:
        main_lib.validate_config(config)
    assert "\n" not in str(raised.value)
    # A sub-block the name does not read is not checked: adamw ignores the subspace block.
    config.optimizer.name = "adamw"
    if not key.startswith("optimizer.inner."):
        main_lib.validate_config(config)


def _int_vectors(tree) -> list[tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves(tree)
    return [x.shape for x in leaves if getattr(x, "dtype", None) == jnp.int32 and x.ndim == 1]


def test_density_and_projector_learning_rate_reach_the_optimizer() -> None:
    """The two keys that were read but not declared (issue 20) now are, and take effect:
    GaSare keeps density * size entries of the 12 x 8 kernel (48 of 96), or rank * max(m, n)
    = 36 without it; OSD's basis moves by its own AdamW, so another projector learning rate
    gives other updates after a step, the same one the same updates."""
    config = importlib.import_module("configs.llama_tiny").get_config()
    opt = config.optimizer
    opt.name, opt.grad_clip, opt.subspace.rank = "gasare", 0.0, 3
    assert _int_vectors(optimizer_lib.build_optimizer(opt, 10).init(PARAMS)) == [(36,)]
    opt.sparse.density = 0.5
    assert _int_vectors(optimizer_lib.build_optimizer(opt, 10).init(PARAMS)) == [(48,)]

    opt.name, opt.warmup_steps = "osd", 0

    def updates(projector_lr: float) -> list[np.ndarray]:
        opt.online.projector_learning_rate = projector_lr
        tx = optimizer_lib.build_optimizer(opt, 10)
        state, out = tx.init(PARAMS), []
        for step in range(3):
            grads = jax.tree.map(lambda p, step=step: jnp.sin(p * (step + 1.5)), PARAMS)
            u, state = tx.update(grads, state, PARAMS)
            out.append(np.asarray(u["mlp"]["kernel"]))
        return out

    small, large, again = updates(0.005), updates(0.5), updates(0.005)
    for a, b in zip(small, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(small[-1] - large[-1]).max() > 1e-3


def test_cli_overrides_reach_the_sub_blocks(monkeypatch) -> None:
    """``--config.optimizer.sparse.density=0.1`` (an unknown flag before) and the renamed keys
    parse on the command line, as ``python -m train`` parses them."""
    from absl import flags
    from ml_collections import config_flags

    from train import cli

    def parse(*overrides: str) -> ml_collections.ConfigDict:
        argv = ["prog", f"--config={ROOT / 'configs' / 'llama_tiny.py'}", *overrides]
        monkeypatch.setattr("sys.argv", argv)  # config_flags finds the overrides in sys.argv
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
        values(argv)
        return values.config

    cli.register_list_parser()
    config = parse(
        "--config.optimizer.sparse.density=0.1",
        "--config.optimizer.online.projector_learning_rate=0.01",
        "--config.optimizer.inner.name=msgd",
        "--config.optimizer.subspace.rank=8",
        "--config.step.layerwise=True",
    )
    assert config.optimizer.sparse.density == 0.1
    assert config.optimizer.online.projector_learning_rate == 0.01
    assert (config.optimizer.inner.name, config.optimizer.subspace.rank) == ("msgd", 8)
    assert config.step.layerwise is True
    with pytest.raises((AttributeError, flags.Error), match="rank"):
        parse("--config.optimizer.rank=8")  # the flat key is gone


def test_side_rules_are_the_library_s() -> None:
    """``optimizer.subspace.side`` allows exactly ``golore_jax.Subspace.side``'s rules."""
    from golore_jax._layout import SIDE_RULES

    assert optimizer_lib.SIDES == SIDE_RULES


def test_model_shapes_are_defined_once() -> None:
    """configs/llama_NAME.py trains models.MODELS[NAME] with its GaLore rank."""
    assert set(PRETRAINING) == set(models.MODELS)
    for name in PRETRAINING:
        config = importlib.import_module(f"configs.{name}").get_config()
        shape = models.MODELS[name]
        model = config.model
        got = (
            model.hidden_size,
            model.intermediate_size,
            model.num_heads,
            model.num_layers,
            model.vocab_size,
            config.optimizer.subspace.rank,
        )
        assert got == tuple(shape), name
        assert config.data.vocab_size == shape.vocab


# A config read with a fallback restates (or invents) a default outside configs/.
CONFIG_GET = re.compile(r"\b(config|cfg|opt|sub|inner|init|data|step)(\.\w+)*\.get\(")


def test_no_config_read_with_a_fallback() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("train", "benchmarks", "experiments")
        for path in sorted((ROOT / folder).glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if CONFIG_GET.search(line)
    ]
    assert not offenders, offenders
