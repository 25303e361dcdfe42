"""How a subspace is chosen: the projectors of GaLore, GoLore and their hybrid.

A projector is called at refresh steps with

* ``key``: a PRNG key for this leaf and this refresh,
* ``g``: the fp32 gradient arranged so that its ROWS are the dimension to compress
  (``G`` for a left projection, ``G^T`` for a right one; see :mod:`golore_jax._layout`),
* ``previous``: the current ``(d, r)`` orthonormal basis (zeros before the first refresh),
* ``step``: the optimizer step count (int32 scalar),

and returns a new ``(d, r)`` basis with orthonormal columns. It runs inside ``jit``; the rank is
read from ``previous.shape``.

Signs. A singular vector (or eigenvector) is defined up to sign, and which sign LAPACK,
cuSOLVER, an SVD or an eigendecomposition returns differs between them. When a refresh keeps
the inner optimizer's moments (GaLore's default), a flipped column turns its kept momentum into
anti-momentum, so the trajectory would depend on the backend. The SVD-based projectors
therefore put every basis in a canonical sign (:func:`canonical_signs`: each column's
largest-magnitude entry positive) unless built with ``canonical_signs=False`` (the raw signs
of the decomposition, e.g. to reproduce another library's run on the same backend).

A projector whose choice depends on ``g`` only through the ``d x d`` Gram matrix ``g g^T`` may
say so (``gram_input = True``) and implement ``from_gram(key, gram, previous, step)``: the
refresh then forms each Gram matrix once and decomposes all Gram matrices of one size in one
batched call, also those of gradients of different shapes (e.g. LLaMA's ``4096 x 4096``
attention and ``4096 x 11008`` MLP weights: one batched ``eigh`` instead of two, whose fixed
cost is paid once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax


def canonical_signs(basis: jax.Array) -> jax.Array:
    """``basis`` (``(..., d, r)``) with each column's sign flipped so that its entry of largest
    magnitude (the first one on ties) is positive; a zero column is left as it is."""
    index = jnp.argmax(jnp.abs(basis), axis=-2)
    largest = jnp.take_along_axis(basis, index[..., None, :], axis=-2)
    return basis * jnp.where(largest < 0, -1.0, 1.0).astype(basis.dtype)


def _signed(basis: jax.Array, canonical: bool) -> jax.Array:
    return canonical_signs(basis) if canonical else basis


class Projector(Protocol):
    """Chooses an orthonormal ``(d, r)`` basis at a refresh step."""

    uses_gradient: bool  # False when the basis does not depend on ``g`` (GoLore)

    def __call__(
        self, key: jax.Array, g: jax.Array, previous: jax.Array, step: jax.Array
    ) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class SVDProjector:
    """GaLore: the top-``r`` left singular vectors of ``g`` (``U[:, :r]``), computed in fp32."""

    canonical_signs: bool = True
    uses_gradient: bool = dataclasses.field(default=True, init=False)

    def __call__(self, key, g, previous, step):
        del key, step
        rank = previous.shape[-1]
        u, _, _ = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
        return _signed(u[:, :rank], self.canonical_signs)


@dataclasses.dataclass(frozen=True)
class ImportanceSVDProjector:
    """``r`` singular directions sampled without replacement, with probability ~ singular value.

    The GoLore authors' code (pkumelon/Golore) chooses its SVD-phase directions this way
    (``torch.multinomial(s, rank)``) instead of the top ``r``. Sampling without replacement
    uses the Gumbel-top-k trick: the ``r`` largest ``log s_i + Gumbel_i`` are a sample of
    ``multinomial(s, r)`` without replacement, under jit and in fixed shapes.
    """

    canonical_signs: bool = True
    uses_gradient: bool = dataclasses.field(default=True, init=False)

    def __call__(self, key, g, previous, step):
        del step
        rank = previous.shape[-1]
        u, s, _ = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
        scores = jnp.log(jnp.maximum(s, jnp.finfo(jnp.float32).tiny)) + jax.random.gumbel(
            key, s.shape
        )
        _, chosen = lax.top_k(scores, rank)
        return _signed(u[:, jnp.sort(chosen)], self.canonical_signs)


@dataclasses.dataclass(frozen=True)
class GramEighProjector:
    """GaLore's subspace from the eigenvectors of the ``d x d`` Gram matrix ``g g^T``.

    The top-``r`` eigenvectors of ``g g^T`` are the top-``r`` left singular vectors of ``g``;
    ``d`` is the smaller side, so this is one symmetric eigendecomposition instead of an SVD
    (about 10x faster on GPUs). Forming ``g g^T`` squares the condition number: directions with
    singular values below ``sqrt(eps) * s_max`` are resolved less accurately than by an SVD,
    which does not matter for the top of a decaying spectrum (the captured energy is checked in
    the tests).
    """

    canonical_signs: bool = True
    uses_gradient: bool = dataclasses.field(default=True, init=False)
    gram_input: bool = dataclasses.field(default=True, init=False)

    def __call__(self, key, g, previous, step):
        g = g.astype(jnp.float32)
        return self.from_gram(key, g @ g.T, previous, step)

    def from_gram(self, key, gram, previous, step):
        del key, step
        _, vectors = jnp.linalg.eigh(gram)  # ascending eigenvalues
        return _signed(vectors[:, ::-1][:, : previous.shape[-1]], self.canonical_signs)


@dataclasses.dataclass(frozen=True)
class SubspaceIterationProjector:
    """Top-``r`` subspace by block power (subspace) iteration, warm-started from ``previous``.

    Between refreshes the gradient's top subspace moves slowly, so a few iterations
    ``X <- orth(g g^T X)`` from the previous basis recover it with matmuls and one QR each;
    a Rayleigh-Ritz step (an ``r x r`` eigendecomposition) then orders the basis like the SVD's
    singular vectors. The first refresh (``previous == 0``) has nothing to start from and uses
    :class:`GramEighProjector` (exact), so the approximation error never compounds from a
    random start.
    """

    iterations: int = 2
    canonical_signs: bool = True
    uses_gradient: bool = dataclasses.field(default=True, init=False)

    def __call__(self, key, g, previous, step):
        del key, step

        def warm(g, previous):
            def body(_, x):
                q, _ = jnp.linalg.qr(g @ (g.T @ x))
                return q

            x = lax.fori_loop(0, self.iterations, body, previous)
            b = x.T @ g  # r x k, the projected matrix
            _, rotation = jnp.linalg.eigh(b @ b.T)
            return _signed(x @ rotation[:, ::-1], self.canonical_signs)

        def cold(g, previous):
            return GramEighProjector(self.canonical_signs)(None, g, previous, None)

        return _cold_or_warm(cold, warm)(g.astype(jnp.float32), previous)


def _cold_or_warm(cold: Callable, warm: Callable) -> Callable:
    """``(g, previous) -> cold(g, previous)`` if ``previous == 0`` (no refresh yet), else ``warm``.

    A ``lax.cond`` with a batched predicate runs both branches under ``vmap`` (it becomes a
    select), so a batched refresh would pay for the exact decomposition at every refresh. The
    batching rule decides once for the whole batch: one branch when all members agree (every
    refresh but a partly-initialised state's), both only for a mixed batch.
    """

    @jax.custom_batching.custom_vmap
    def choose(g, previous):
        return lax.cond(jnp.all(previous == 0), cold, warm, g, previous)

    @choose.def_vmap
    def choose_batched(axis_size, in_batched, g, previous):
        g, previous = (
            x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip((g, previous), in_batched, strict=True)
        )
        is_cold = jnp.all(previous == 0, axis=(-2, -1))

        def all_cold():
            return jax.vmap(cold)(g, previous)

        def all_warm():
            return jax.vmap(warm)(g, previous)

        def mixed():
            return jnp.where(is_cold[:, None, None], all_cold(), all_warm())

        branch = jnp.where(jnp.all(is_cold), 0, jnp.where(jnp.any(is_cold), 1, 2))
        return lax.switch(branch, [all_cold, mixed, all_warm]), True

    return choose


@dataclasses.dataclass(frozen=True)
class RandomProjector:
    """GoLore: a basis drawn uniformly (Haar) from the Stiefel manifold ``St(d, r)``.

    Proposition 1 of the paper: for ``Z`` with i.i.d. N(0, 1) entries, both ``Z (Z^T Z)^{-1/2}``
    (``method="polar"``) and the QR factor ``Q`` with the signs of ``diag(R)`` folded in
    (``method="qr"``) are Haar distributed. A QR without the sign fix is not.
    """

    method: str = "qr"
    uses_gradient: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        if self.method not in ("qr", "polar"):
            raise ValueError(
                f"random projector method must be 'qr' or 'polar', got {self.method!r}"
            )

    def __call__(self, key, g, previous, step):
        del g, step
        return haar_stiefel(key, previous.shape, method=self.method)


@dataclasses.dataclass(frozen=True)
class HybridProjector:
    """GoLore@x%: ``before`` until ``switch_step``, ``after`` from then on.

    The switch is decided at refresh steps: the first refresh at a step ``>= switch_step`` uses
    ``after``. Only the selected branch runs (``lax.cond``).
    """

    switch_step: int
    before: Projector
    after: Projector

    @property
    def uses_gradient(self) -> bool:
        return self.before.uses_gradient or self.after.uses_gradient

    @property
    def gram_input(self) -> bool:
        # A projector that ignores g is indifferent to being handed g g^T instead.
        return all(reads_gram(p) or not p.uses_gradient for p in (self.before, self.after))

    def __call__(self, key, g, previous, step):
        return self._switch(self.before, self.after, key, g, previous, step)

    def from_gram(self, key, gram, previous, step):
        before, after = (p.from_gram if reads_gram(p) else p for p in (self.before, self.after))
        return self._switch(before, after, key, gram, previous, step)

    def _switch(self, before, after, key, x, previous, step):
        return lax.cond(
            step >= self.switch_step,
            lambda: after(key, x, previous, step),
            lambda: before(key, x, previous, step),
        )


@dataclasses.dataclass(frozen=True)
class IdentityProjector:
    """The first ``r`` coordinate axes, ``I[:, :r]``.

    At full rank this makes the subspace transform equal to its inner transform, which is how
    equivalences are tested; at lower rank it is a fixed coordinate subspace.
    """

    uses_gradient: bool = dataclasses.field(default=False, init=False)

    def __call__(self, key, g, previous, step):
        del key, g, step
        return jnp.eye(*previous.shape, dtype=previous.dtype)


def reads_gram(projector: Projector) -> bool:
    """Whether ``projector`` chooses from ``g g^T`` alone (``gram_input``, with ``from_gram``)."""
    return bool(getattr(projector, "gram_input", False))


def haar_stiefel(key: jax.Array, shape: tuple[int, int], method: str = "qr") -> jax.Array:
    """Samples a ``(d, r)`` matrix uniformly from the Stiefel manifold (Proposition 1)."""
    z = jax.random.normal(key, shape, dtype=jnp.float32)
    if method == "qr":
        q, r = jnp.linalg.qr(z)
        # Without this sign fix, QR's convention (e.g. positive or negative diag(R)) biases Q.
        signs = jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)
        return q * signs[None, :]
    # Polar factor Z (Z^T Z)^{-1/2} through an r x r eigendecomposition.
    w, v = jnp.linalg.eigh(z.T @ z)
    return z @ ((v * lax.rsqrt(w)[None, :]) @ v.T)


def svd(canonical_signs: bool = True) -> SVDProjector:
    """GaLore's projector: top-r singular vectors of the minibatch (or large-batch) gradient.

    ``canonical_signs``: each column's largest-magnitude entry positive (False: LAPACK's).

    >>> g = jnp.diag(jnp.array([3.0, 2.0, 1.0]))  # rows: the projected dim
    >>> svd()(jax.random.key(0), g, jnp.zeros((3, 2)), 0).tolist()
    [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    return SVDProjector(canonical_signs)


def importance_svd(canonical_signs: bool = True) -> ImportanceSVDProjector:
    """The GoLore authors' SVD variant: directions sampled with probability ~ singular value."""
    return ImportanceSVDProjector(canonical_signs)


def gram_eigh(canonical_signs: bool = True) -> GramEighProjector:
    """GaLore's subspace through an eigendecomposition of the smaller Gram matrix (fast); with
    ``canonical_signs`` the same basis as :func:`svd`'s up to rounding."""
    return GramEighProjector(canonical_signs)


def subspace_iteration(
    iterations: int = 2, canonical_signs: bool = True
) -> SubspaceIterationProjector:
    """GaLore's subspace by warm-started subspace iteration: a few matmuls and QRs a refresh."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return SubspaceIterationProjector(iterations, canonical_signs)


def random(method: str = "qr") -> RandomProjector:
    """GoLore's projector: uniform on the Stiefel manifold, independent of the gradient.

    >>> p = random()(jax.random.key(0), jnp.zeros((5, 0)), jnp.zeros((5, 2)), 0)
    >>> p.shape, bool(jnp.allclose(p.T @ p, jnp.eye(2), atol=1e-5))
    ((5, 2), True)
    """
    return RandomProjector(method)


def hybrid(
    switch_step: int, before: Projector | None = None, after: Projector | None = None
) -> HybridProjector:
    """GoLore@x%: ``before`` (default :func:`svd`) then ``after`` (default :func:`random`)."""
    if int(switch_step) < 0:
        raise ValueError(f"switch_step must be >= 0, got {switch_step}")
    return HybridProjector(
        int(switch_step), before if before is not None else svd(), after or random()
    )


def identity() -> IdentityProjector:
    """The fixed coordinate subspace ``I[:, :r]`` (a reference for equivalence tests)."""
    return IdentityProjector()


def golore_projector(
    golore_fraction: float, total_steps: int | None, before: Projector | None = None
) -> Projector:
    """GoLore@x%: random for the last ``golore_fraction`` of ``total_steps``, ``before``
    (default: the exact SVD) until then.

    >>> golore_projector(0.2, 1000).switch_step
    800
    >>> type(golore_projector(1.0, None)).__name__
    'RandomProjector'
    """
    if not 0.0 < golore_fraction <= 1.0:
        raise ValueError(f"golore_fraction must be in (0, 1], got {golore_fraction}")
    if golore_fraction == 1.0:
        return random()
    if total_steps is None or total_steps <= 0:
        raise ValueError(
            f"golore_fraction={golore_fraction} needs total_steps > 0 to place the switch, "
            f"got total_steps={total_steps}"
        )
    return hybrid(switch_step=round((1.0 - golore_fraction) * total_steps), before=before)
