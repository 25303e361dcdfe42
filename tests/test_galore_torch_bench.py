"""benchmarks/galore_torch_step.py's per-layer mode and random basis (needs galore-torch: its
wheel in .whl/ or installed; skipped otherwise)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchmarks import galore_torch_step as bench  # noqa: E402


@pytest.fixture(scope="module")
def galore_torch():
    try:
        return bench.import_galore_torch()
    except ImportError:
        pytest.skip("galore-torch is not installed and .whl/ holds no wheel")


def _model():
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)  # fp32: the two modes compare exactly


def test_per_layer_mode_equals_one_optimizer_for_all(galore_torch):
    """One GaLoreAdamW per parameter stepped in the backward hooks gives the same weights as
    one GaLoreAdamW stepped after the backward pass (3 steps, the first refreshes)."""
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for per_layer in (False, True):
        model = _model()
        if per_layer:
            opts = bench.per_layer_optimizers(
                model, galore_torch.GaLoreAdamW, 4, 2, no_deprecation_warning=True
            )
            assert len(opts) == len(list(model.parameters()))
        else:
            groups = bench.galore_param_groups(model, 4, 2)
            opt = galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)
        for _ in range(3):
            model(input_ids=tokens, labels=tokens).loss.backward()
            if not per_layer:
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())  # freed in the hooks too
        results.append([p.detach().clone() for p in model.parameters()])
    moved = 0
    for a, b, init in zip(*results, _model().parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(a, init.detach()))
    assert moved == len(results[0])


def test_random_basis_is_orthonormal_with_galores_shapes(galore_torch, monkeypatch):
    cls = galore_torch.galore_projector.GaLoreProjector
    monkeypatch.setattr(cls, "get_orthogonal_matrix", cls.get_orthogonal_matrix)  # restored after
    bench.use_random_basis(galore_torch)
    projector = cls(rank=4)
    for shape, side in (((20, 12), "right"), ((12, 20), "left")):
        basis = projector.get_orthogonal_matrix(torch.zeros(shape), 4, side)
        q = basis.t() if side == "right" else basis
        assert tuple(basis.shape) == ((4, 12) if side == "right" else (12, 4))
        torch.testing.assert_close(q.t() @ q, torch.eye(4), rtol=0, atol=1e-5)
