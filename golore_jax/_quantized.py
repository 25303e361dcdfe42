"""8-bit Adam: block-wise quantised first and second moments as an optax transformation.

Dettmers, Lewis, Shleifer and Zettlemoyer, "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022, arXiv 2110.02861). Each moment leaf is flattened, padded with zeros to a multiple of
``block_size`` and cut into blocks; a block stores one fp32 ``absmax`` scale and one 8-bit code
per element. A code indexes a fixed table of levels in ``[-1, 1]`` (first moment) or ``[0, 1]``
(second moment) and dequantises to ``level * absmax``. Quantisation picks the *nearest* level
(bitsandbytes binary-searches its table; these maps invert in closed form, then the nearest
of three neighbouring levels is taken), so for every element

    |x - dequantize(quantize(x))| <= absmax_of_its_block * max_gap(table) / 2.

Maps (simpler than bitsandbytes' dynamic-tree map, but non-linear for the same reason: Adam's
moments are mostly small relative to their block's absmax):

* first moment ``mu`` (signed, int8 codes ``c`` in ``[-127, 127]``): ``sign(c) (c / 127)^2``,
  a square-law ("sqrt-companded") map. Step near 0 is ``1/127^2``; the largest step is
  ``(127^2 - 126^2) / 127^2`` so the error bound is ``absmax * 253 / (2 * 127^2) < absmax / 127``.
* second moment ``nu`` (unsigned, uint8 codes ``c`` in ``[0, 255]``): ``(c / 255)^4``, i.e.
  ``nu^(1/4)`` stored linearly (``sqrt(nu)`` with a square-law map). The smallest non-zero level
  is ``255^-4 ~ 2.4e-10`` of the block's absmax, which keeps the small second moments that the
  Adam denominator divides by. Error bound ``absmax * (1 - (254/255)^4) / 2 < absmax / 127``.
  Entries with ``nu < absmax * 255^-4 / 2`` in a block round to 0 (the update then divides by
  ``eps``, as fp32 Adam would for a zero second moment).

Each update dequantises, runs the Adam recursion and bias correction of
:func:`optax.scale_by_adam` in fp32, computes the update from the fp32 moments and only then
requantises them for storage (as the fused bitsandbytes kernel does).

Leaves with fewer than ``min_size`` elements keep fp32 moments (bitsandbytes keeps tensors under
4096 elements in 32 bits); larger ones, including 1-D ones, are quantised with zero padding.

Inside :func:`golore_jax.scale_by_subspace` the inner state lives on the low-rank shapes, so the
quantised moments are those of the projected gradients. Their state declares no moment to
:mod:`golore_jax._rotation` (``register_moments(ScaleByAdam8bitState, {})``), so
``momentum_projection=True`` and ``second_moment="project"``/``"reset"`` do not apply to 8-bit
moments (they are kept as they are, GaLore's default behaviour): rotating codes would be
meaningless.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from golore_jax import _rotation as rotation

# Levels of the signed first-moment map, ascending; code c in [-127, 127] is index c + 127.
_K_SIGNED = np.arange(-127, 128, dtype=np.float64)
SIGNED_LEVELS = np.asarray(np.sign(_K_SIGNED) * (_K_SIGNED / 127.0) ** 2, dtype=np.float32)
# Levels of the unsigned second-moment map, ascending; code c in [0, 255] is index c.
UNSIGNED_LEVELS = np.asarray((np.arange(256, dtype=np.float64) / 255.0) ** 4, dtype=np.float32)
SIGNED_OFFSET = 127


def max_error_fraction(levels: np.ndarray) -> float:
    """Half the largest gap between consecutive levels: the round-trip error bound / absmax."""
    return float(np.max(np.diff(levels.astype(np.float64))) / 2.0)


class QuantizedArray(NamedTuple):
    """One block-wise quantised leaf.

    Attributes:
      codes: ``(n_blocks, block_size)`` int8 (signed map) or uint8 (unsigned map) codes.
      absmax: ``(n_blocks,)`` fp32 scale per block (max ``|x|`` of the block; 0 for all-zero).
    """

    codes: jax.Array
    absmax: jax.Array


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`.

    Attributes:
      count: number of updates so far (int32), for bias correction.
      mu_q: first moments, like params: a :class:`QuantizedArray` (int8 codes) per quantised
        leaf, or an fp32 array of the leaf's shape for leaves under ``min_size`` elements.
      nu_q: second moments, same layout with uint8 codes.
    """

    count: jax.Array
    mu_q: Any
    nu_q: Any


def _num_blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def quantize_blockwise(x: jax.Array, levels: np.ndarray, block_size: int) -> QuantizedArray:
    """Nearest-level block-wise quantisation of ``x`` with the map ``levels``.

    ``levels`` must be :data:`SIGNED_LEVELS` or :data:`UNSIGNED_LEVELS` (the level is found by
    inverting those maps in closed form, not by a search over an arbitrary table).

    Codes are int8 (``index - 127``) when ``levels`` has 255 entries starting at -1 (the signed
    map), uint8 indices otherwise.
    """
    flat = jnp.ravel(x).astype(jnp.float32)
    n_blocks = _num_blocks(flat.size, block_size)
    flat = jnp.pad(flat, (0, n_blocks * block_size - flat.size))
    blocks = flat.reshape(n_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normalized = blocks / safe[:, None]
    table = jnp.asarray(levels)
    signed = levels[0] < 0
    # The maps are sign(c) (c / L)^p: invert, then pick the nearest of three neighbours in the
    # linear domain, so fp32 error in the inverse cannot pick a non-nearest level.
    power, top = (2.0, SIGNED_OFFSET) if signed else (4.0, levels.size - 1)
    guess = jnp.floor(top * jnp.abs(normalized) ** (1.0 / power) + 0.5).astype(jnp.int32)
    guess = jnp.where(normalized < 0, -guess, guess) + (SIGNED_OFFSET if signed else 0)
    index = guess
    best = jnp.abs(table[jnp.clip(guess, 0, levels.size - 1)] - normalized)
    for shift in (-1, 1):
        candidate = jnp.clip(guess + shift, 0, levels.size - 1)
        error = jnp.abs(table[candidate] - normalized)
        index = jnp.where(error < best, candidate, index)
        best = jnp.minimum(error, best)
    index = jnp.clip(index, 0, levels.size - 1)
    codes = (index - SIGNED_OFFSET).astype(jnp.int8) if signed else index.astype(jnp.uint8)
    return QuantizedArray(codes=codes, absmax=absmax)


def dequantize_blockwise(
    q: QuantizedArray, levels: np.ndarray, shape: tuple[int, ...]
) -> jax.Array:
    """fp32 array of ``shape`` from :func:`quantize_blockwise`'s output (padding dropped)."""
    index = q.codes.astype(jnp.int32)
    if levels[0] < 0:
        index = index + SIGNED_OFFSET
    values = jnp.asarray(levels)[index] * q.absmax[:, None]
    size = int(np.prod(shape, dtype=np.int64))
    return values.reshape(-1)[:size].reshape(shape)


def _init_moment(leaf: jax.Array, levels: np.ndarray, block_size: int, min_size: int) -> Any:
    size = int(np.prod(jnp.shape(leaf), dtype=np.int64))
    if size < min_size:
        return jnp.zeros(jnp.shape(leaf), jnp.float32)
    n_blocks = _num_blocks(size, block_size)
    dtype = jnp.int8 if levels[0] < 0 else jnp.uint8
    return QuantizedArray(
        codes=jnp.zeros((n_blocks, block_size), dtype),
        absmax=jnp.zeros((n_blocks,), jnp.float32),
    )


def _load(moment: Any, levels: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    if isinstance(moment, QuantizedArray):
        return dequantize_blockwise(moment, levels, shape)
    return moment


def _store(value: jax.Array, like: Any, levels: np.ndarray, block_size: int) -> Any:
    if isinstance(like, QuantizedArray):
        return quantize_blockwise(value, levels, block_size)
    return value


def state_nbytes(state: Any) -> int:
    """Bytes held by the array leaves of ``state`` (any optax state)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    *,
    block_size: int = 256,
    min_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam scaling (as :func:`optax.scale_by_adam`) with 8-bit block-wise quantised moments.

    Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization". See the module
    docstring for the maps and the error bounds.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to ``sqrt(nu_hat)`` in the denominator.
      eps_root: added to ``nu_hat`` inside the square root.
      block_size: elements per quantisation block (one fp32 absmax each); positive int.
      min_size: leaves with fewer elements keep fp32 moments (bitsandbytes: 4096).

    State bytes of a quantised leaf of ``n`` elements: ``2 * B * block_size + 8 * B`` with
    ``B = ceil(n / block_size)``, against ``8 * n`` for fp32 moments (about 1/4).

    >>> params = {"w": jnp.zeros((64, 64))}
    >>> state = scale_by_adam_8bit(min_size=1024).init(params)
    >>> state.mu_q["w"].codes.dtype.name, state.mu_q["w"].codes.shape, state_nbytes(state)
    ('int8', (16, 256), 8324)
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(
            f"scale_by_adam_8bit: block_size must be a positive int, got {block_size!r}"
        )
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"scale_by_adam_8bit: min_size must be an int >= 0, got {min_size!r}")

    def init_fn(params: Any) -> ScaleByAdam8bitState:
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu_q=jax.tree.map(
                lambda p: _init_moment(p, SIGNED_LEVELS, block_size, min_size), params
            ),
            nu_q=jax.tree.map(
                lambda p: _init_moment(p, UNSIGNED_LEVELS, block_size, min_size), params
            ),
        )

    def update_fn(
        updates: Any, state: ScaleByAdam8bitState, params: Any = None
    ) -> tuple[Any, ScaleByAdam8bitState]:
        del params
        count = optax.safe_increment(state.count)
        correction1 = 1.0 - b1 ** count.astype(jnp.float32)
        correction2 = 1.0 - b2 ** count.astype(jnp.float32)
        grads, treedef = jax.tree.flatten(updates)
        mus = treedef.flatten_up_to(state.mu_q)
        nus = treedef.flatten_up_to(state.nu_q)
        new_updates, new_mus, new_nus = [], [], []
        for g, mu_old, nu_old in zip(grads, mus, nus, strict=True):
            shape = tuple(jnp.shape(g))
            g32 = jnp.asarray(g, jnp.float32)
            mu = b1 * _load(mu_old, SIGNED_LEVELS, shape) + (1.0 - b1) * g32
            nu = b2 * _load(nu_old, UNSIGNED_LEVELS, shape) + (1.0 - b2) * g32 * g32
            mu_hat = mu / correction1
            nu_hat = nu / correction2
            new_updates.append((mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)).astype(g.dtype))
            new_mus.append(_store(mu, mu_old, SIGNED_LEVELS, block_size))
            new_nus.append(_store(nu, nu_old, UNSIGNED_LEVELS, block_size))
        return treedef.unflatten(new_updates), ScaleByAdam8bitState(
            count=count,
            mu_q=treedef.unflatten(new_mus),
            nu_q=treedef.unflatten(new_nus),
        )

    return optax.GradientTransformation(init_fn, update_fn)


# The codes are not moments a change of basis may rotate (see the module docstring).
rotation.register_moments(ScaleByAdam8bitState, {})
