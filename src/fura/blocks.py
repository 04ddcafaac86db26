"""The block math of FuRA: block shapes, ranks, the block-wise SVD, the explicit layout and fingerprints.

Everything here is pure tensor math, with no module surgery; `fura.implicit` computes with what it builds.
Words are the paper's (docs/design.md#glossary). Each layer cuts one side of W into blocks, and the math
is written on the *blocked weight* ``A``, the weight turned so that its columns are that side: ``A = W``
(out × in) in `output_one_block` mode, whose input dimension is cut into ``n`` blocks of size ``b``, and
``A = Wᵀ`` in `input_one_block` mode, whose output dimension is. In A, block ``j`` factorizes as
``A_j = U_j diag(s_j) V_jᵀ`` and ``A = L·S·R`` with ``L = [U_1 … U_n]``, ``S = diag(s)`` and
``R = blockdiag(V_jᵀ)``. The trainable small core ``R_j`` (r × b) starts at ``V_jᵀ`` and the singular values
``σ_j`` start at ``s_j``. The adapted matrix is

    A(R, σ) = A0 · blockdiag_j(M_j),        M_j = B_j · diag(σ_j) · R_j        (b × b)

where the frozen *left factor* ``B_j = V_j · diag(1 / s_j)`` stands for L (``U_j = A0_j B_j``), so the
large core L is never materialised. The implementation note (docs/design.md#the-implicit-form) derives this
form. The explicit layout (`factorize_explicit`, `explicit_weight`) stores ``L_k = A0_k B_k`` over an
m × n grid of W, built by the same `factorize`, for what this form cannot express.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

RankSpec = Literal["full"] | int | float

# s_merged_to values that keep S as a separate vector, and those that merge it into a core at init.
KEEP_MODES = ("keep_trainable", "keep_frozen")
MERGE_MODES = ("trainable", "frozen", "input", "output", "split")


def closest_factor_pair(d: int) -> tuple[int, int]:
    """Return ``(p, q)`` with ``p * q == d``, ``p <= q`` and ``q - p`` as small as possible.

    ``p`` is the number of blocks and ``q`` the block size. For example 4096 gives (64, 64),
    14336 gives (112, 128) and a prime gives (1, d).
    """
    if d < 1:
        raise ValueError(f"cannot factorize dimension {d}")
    p = math.isqrt(d)
    while d % p:
        p -= 1
    return p, d // p


def resolve_rank(rank: RankSpec, rows: int, n_blocks: int, block: int) -> int:
    """Rank of each block of a blocked weight with ``rows`` rows and ``n_blocks`` column blocks of width ``block``.

    ``"full"`` gives ``min(rows, block)``, which is lossless. An int is capped at full rank. A float
    ρ in (0, 1) is a parameter budget: ``r ≈ ρ·rows·(n·block) / (n·(rows + block))``, so both cores
    together hold about a fraction ρ of the weight. Of floor and ceil it takes the one whose count
    is nearer, with ties going to floor as in the research code.
    """
    full = min(rows, block)
    if rank == "full":
        return full
    if isinstance(rank, bool):
        raise ValueError(f"rank must be 'full', a positive int or a float in (0, 1), got {rank!r}")
    if isinstance(rank, int):
        if rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank}")
        return min(rank, full)
    if isinstance(rank, float):
        if not 0.0 < rank < 1.0:
            raise ValueError(f"a float rank is a parameter-budget fraction in (0, 1), got {rank}")
        target = rank * rows * n_blocks * block
        per_rank = n_blocks * (rows + block)
        exact = target / per_rank
        lo, hi = max(1, math.floor(exact)), max(1, math.ceil(exact))
        r = lo if abs(lo * per_rank - target) <= abs(hi * per_rank - target) else hi
        return min(r, full)
    raise ValueError(f"rank must be 'full', a positive int or a float in (0, 1), got {rank!r}")


@dataclass(frozen=True)
class Factorization:
    """The frozen and initial trainable tensors of one blocked weight.

    ``left_factor`` is the frozen ``B = V·diag(scale)`` (n, b, r), which stands for L. ``right`` is the initial
    trainable small core R (n, r, b). ``sigma`` is the initial singular-value vector (n, r), or None when S
    was merged into a core.
    """

    left_factor: torch.Tensor
    right: torch.Tensor
    sigma: torch.Tensor | None


# Precision of the block factorization: "auto" computes in fp32 and redoes in fp64 each block whose
# conditioning fp32 cannot resolve (always fp64 on an fp64 base); "float32" and "float64" force one precision.
Precision = Literal["auto", "float32", "float64"]
PRECISIONS = ("auto", "float32", "float64")

# "auto" accepts a block's fp32 factorization when eps32·λ_1/λ_r ≤ FP32_TOLERANCE (λ: eigenvalues of the
# block's Gram matrix, i.e. squared singular values; λ_r the smallest one kept). fp32 rounding in the Gram
# matrix and its eigendecomposition perturbs every λ by about eps32·λ_1, so this bounds the relative error
# of the smallest kept singular value and the loss of orthonormality of U = A·V/s. Measured on random
# 4096×64 fp32 blocks against an fp64 SVD: condition number 10 (eps32·λ_1/λ_r = 1.2e-5) gives 3e-6,
# 30 (1.1e-4) gives 1.1e-5, 100 (1.2e-3) gives 1.6e-4. So fp32 is kept up to condition numbers of
# about 29, which all-MiniLM-L6-v2's blocks (≤ 6.1) and random Llama-shaped blocks (≤ 2) are far below.
FP32_TOLERANCE = 1e-4
_EPS32 = torch.finfo(torch.float32).eps


def _resolve_precision(dtype: Precision | torch.dtype, blocked: torch.Tensor) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in PRECISIONS:
        raise ValueError(f"factorization precision must be one of {PRECISIONS}, got {dtype!r}")
    if dtype == "auto" and blocked.dtype == torch.float64:
        return "float64"  # an fp64 base keeps an fp64 adapter: factorize at its precision
    return dtype


def _gram_matrices(
    blocked: torch.Tensor, n_blocks: int, dtype: torch.dtype, index: torch.Tensor | None = None
) -> torch.Tensor:
    """``A_jᵀA_j`` (k, b, b) for the column blocks ``index`` of ``blocked`` (all when None), accumulated in ``dtype``.

    One batched product over strided views, without copying the blocked weight when it is already in ``dtype``.
    Otherwise it casts chunks of about 16M elements, so the extra memory stays small. A stack of blocked weights
    (E, rows, cols), such as the experts of a Mixture-of-Experts layer, gives the E·n blocks expert-major.
    """
    stack = blocked.shape[0] if blocked.ndim == 3 else 1
    rows, cols = blocked.shape[-2:]
    block = cols // n_blocks
    count = stack * n_blocks if index is None else len(index)
    gram = torch.zeros(count, block, block, dtype=dtype, device=blocked.device)
    needs_copy = blocked.dtype != dtype or index is not None or blocked.ndim == 3
    chunk = max(1, (1 << 24) // max(stack * n_blocks * block, 1)) if needs_copy else rows
    # Full fp32 products: TF32 (or bf16 on CPU) under a lower matmul precision would void the check in block_svd.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for start in range(0, rows, chunk):
            if blocked.ndim == 3:  # (E, t, n·b) → (t, E·n, b): one copy of the chunk, the blocks expert-major
                part = blocked[:, start : start + chunk].transpose(0, 1).reshape(-1, stack * n_blocks, block)
            else:
                part = blocked[start : start + chunk].reshape(-1, n_blocks, block)
            if index is not None:
                part = part[:, index]
            part = part.to(dtype).transpose(0, 1)  # (k, t, b)
            gram.baddbmm_(part.transpose(1, 2), part)
    finally:
        torch.set_float32_matmul_precision(precision)
    return gram


@contextmanager
def _few_threads(size: int):
    """Run small eigendecompositions on one thread: MKL's threaded ``syevd`` on b ≤ 512 is slower, and
    collapses when the CPU is shared (measured 0.7 ms against 13 ms per 128×128 block on 2 busy cores)."""
    threads = torch.get_num_threads()
    if size > 512 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sorted_eigh(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (k, rank) and eigenvectors (k, b, rank) of symmetric ``gram``, largest first.

    Each eigenvector's sign is fixed (its largest-magnitude entry is positive): LAPACK's choice of sign
    depends on the thread count and the code path, and two processes must build the same adapter tensors
    (a sharded run saves what a single process would; an adapter file is reproducible across machines).
    """
    with _few_threads(gram.shape[-1]):
        eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
    eigvals, eigvecs = eigvals.flip(-1)[:, :rank], eigvecs.flip(-1)[:, :, :rank]
    pivot = eigvecs.gather(1, eigvecs.abs().argmax(dim=1, keepdim=True))  # (k, 1, rank)
    return eigvals, eigvecs * torch.where(pivot < 0, -1.0, 1.0).to(eigvecs.dtype)


def float_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` detached, as fp32 unless it is fp32 or fp64 already: one copy for the factorization and fingerprint.

    The factorization computes in fp32 at least, and casting a half-precision weight chunk by chunk, once per
    use, costs about as much as the Gram matrices themselves on a CPU.
    """
    weight = weight.detach()
    return weight if weight.dtype in (torch.float32, torch.float64) else weight.float()


def block_svd(
    blocked: torch.Tensor, n_blocks: int, rank: int, dtype: Precision | torch.dtype = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and singular values of each column block of ``blocked``, largest first.

    Returns ``V`` (n, b, r) and ``s`` (n, r), in fp64 when any block was computed in fp64, else fp32. A stack
    of blocked weights (E, rows, cols) is factorized in the same single batched call, giving (E·n, b, r) and (E·n, r).
    It works through each block's Gram matrix ``A_jᵀA_j`` (b × b) and its symmetric
    eigendecomposition. That never allocates a W-sized ``U`` and costs one pass over the weight. Only
    ``V`` and ``s`` matter here: the implicit form rebuilds ``U = A V / s`` exactly.

    ``dtype`` is the precision (see `Precision`). With ``"auto"`` every block is done in fp32 and then
    checked: a block whose eigenvalue spread exceeds what fp32 resolves (`FP32_TOLERANCE`) is redone
    in fp64 from the original weight. fp32 is 2–10× faster, since batched fp64 products are slower.
    """
    cols = blocked.shape[-1]
    block = cols // n_blocks
    if n_blocks * block != cols:
        raise ValueError(f"{cols} columns do not split into {n_blocks} blocks")
    precision = _resolve_precision(dtype, blocked)
    if precision == "float64":
        eigvals, vectors = _sorted_eigh(_gram_matrices(blocked, n_blocks, torch.float64), rank)
        return vectors, eigvals.clamp_min(0).sqrt()
    eigvals, vectors = _sorted_eigh(_gram_matrices(blocked, n_blocks, torch.float32), rank)
    if precision == "auto":
        # Ill-conditioned where fp32 rounding (≈ eps32·λ_1) is a large part of the smallest kept λ.
        unresolved = eigvals[:, -1] * FP32_TOLERANCE < _EPS32 * eigvals[:, 0]
        if unresolved.any():
            index = unresolved.nonzero().squeeze(1)
            logger.debug(
                "%d of %d blocks are ill-conditioned for fp32; factorizing them in fp64", len(index), len(eigvals)
            )
            exact_vals, exact_vecs = _sorted_eigh(_gram_matrices(blocked, n_blocks, torch.float64, index), rank)
            eigvals, vectors = eigvals.double(), vectors.double()
            eigvals[index], vectors[index] = exact_vals, exact_vecs
    return vectors, eigvals.clamp_min(0).sqrt()


def factorize(
    blocked: torch.Tensor,
    n_blocks: int,
    rank: int,
    s_side: Literal["keep", "right", "left", "split"],
    dtype: Precision | torch.dtype = "auto",
    rel_tol: float = 1e-6,
) -> Factorization:
    """Factorize ``blocked`` into its implicit FuRA tensors.

    ``s_side`` says where S lives. ``"keep"`` keeps it as its own vector. ``"right"`` merges it into the
    trainable core (R ← S·Vᵀ). ``"left"`` merges it into the frozen large core (L ← U·S, through B).
    ``"split"`` puts √S on each side. Singular values below ``rel_tol`` times the largest of the whole
    blocked weight (and below 1e-12) are clamped there, so that ``U = A V / s`` stays finite even for a zero block.
    That is still lossless at init, because ``M = B diag(σ) R`` is then ``V Vᵀ``. The clamped
    directions lie outside the range of ``A0``, so no update can reach them: a zero block stays
    zero, and a warning says so.
    """
    v, s = block_svd(blocked, n_blocks, rank, dtype)
    floor = (s.max() * rel_tol).clamp_min(1e-12)
    clamped = int((s < floor).sum())
    if clamped:
        logger.warning(
            "%d of %d singular values of a %d×%d weight are (near) zero: FuRA cannot update those directions "
            "(the implicit form only moves within the range of the pretrained blocks; a zero block stays zero)",
            clamped,
            s.numel(),
            *blocked.shape[-2:],
        )
    s = s.clamp_min(floor)
    # Each row pairs the scale on the frozen left factor B with the one on the trainable core R.
    left_scale, right_scale = {
        "keep": (1.0 / s, torch.ones_like(s)),
        "right": (1.0 / s, s),
        "left": (torch.ones_like(s), torch.ones_like(s)),
        "split": (s.rsqrt(), s.sqrt()),
    }[s_side]
    left_factor = v * left_scale.unsqueeze(1)
    right = v.transpose(1, 2) * right_scale.unsqueeze(2)
    return Factorization(left_factor=left_factor, right=right, sigma=s.clone() if s_side == "keep" else None)


def block_transform(left: torch.Tensor, right: torch.Tensor, sigma: torch.Tensor | None) -> torch.Tensor:
    """``left_j · diag(σ_j) · right_j`` for every block.

    In the implicit form ``left`` is the left factor B and this is ``M_j = B_j · diag(σ_j) · R_j``:
    (n, b, r) × (n, r) × (n, r, b) → (n, b, b). The explicit layout uses it for its blocks
    ``L_k diag(S_k) R_k``: (k, a, r) × (k, r) × (k, r, b) → (k, a, b).
    """
    if sigma is not None:
        left = left * sigma.unsqueeze(1)
    return torch.bmm(left, right)


@dataclass(frozen=True)
class ExplicitFactorization:
    """The paper's L (m·n, a, r), R (m·n, r, b) and S (m·n, r), or None when S was merged into a core."""

    left: torch.Tensor
    right: torch.Tensor
    sigma: torch.Tensor | None


def factorize_explicit(
    weight: torch.Tensor,
    m_blocks: int,
    n_blocks: int,
    rank: int,
    s_side: Literal["keep", "right", "left", "split"],
    dtype: Precision | torch.dtype = "auto",
    rel_tol: float = 1e-6,
) -> ExplicitFactorization:
    """Factorize ``weight`` over an m × n grid into stored cores ``W_k = L_k diag(S_k) R_k``.

    This is `factorize` applied to the grid's blocks laid side by side (a × m·n·b), so the input
    side R is the trainable core and the output side L is ``A_k B_k`` (that is ``U_k``, with S on the same
    side: ``"right"`` puts S into R, ``"left"`` into L). It is lossless at full rank, as the implicit form.
    """
    rows, cols = weight.shape
    a, b, k = rows // m_blocks, cols // n_blocks, m_blocks * n_blocks
    if m_blocks * a != rows or n_blocks * b != cols:
        raise ValueError(f"a {rows}×{cols} weight does not split into a {m_blocks}×{n_blocks} grid of blocks")
    # Row strips side by side (one copy of the weight): column block k = i·n + j is block (i, j).
    side_by_side = weight.reshape(m_blocks, a, cols).transpose(0, 1).reshape(a, m_blocks * cols)
    fac = factorize(side_by_side, k, rank, s_side, dtype=dtype, rel_tol=rel_tol)
    tiles = side_by_side.reshape(a, k, b).transpose(0, 1)  # (k, a, b), a view
    left = torch.bmm(tiles.to(fac.left_factor.dtype), fac.left_factor)
    return ExplicitFactorization(left=left, right=fac.right, sigma=fac.sigma)


def explicit_weight(left: torch.Tensor, right: torch.Tensor, sigma: torch.Tensor | None, m_blocks: int) -> torch.Tensor:
    """``W(L, S, R)``: the (m·a × n·b) matrix whose block (i, j) is ``L_k diag(S_k) R_k``, k = i·n + j."""
    tiles = block_transform(left, right, sigma)  # (m·n, a, b)
    k, a, b = tiles.shape
    n_blocks = k // m_blocks
    return tiles.reshape(m_blocks, n_blocks, a, b).permute(0, 2, 1, 3).reshape(m_blocks * a, n_blocks * b)


FINGERPRINT_SIZE = (8, 8)


def probe_matrices(rows: int, cols: int, k: int = FINGERPRINT_SIZE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed ±1 probes (``rows`` × k and ``cols`` × k), identical on every machine (seeded CPU generator)."""
    gen = torch.Generator().manual_seed(0x46755241)
    left = torch.randint(0, 2, (rows, k), generator=gen).float() * 2 - 1
    right = torch.randint(0, 2, (cols, k), generator=gen).float() * 2 - 1
    return left, right


def fingerprint(weight: torch.Tensor, k: int = FINGERPRINT_SIZE[0]) -> torch.Tensor:
    """A k × k sketch ``Pᵀ W Q`` of a weight. It tells checkpoints apart, but changes little under a cast or NF4.

    Measured relative distances: the same weight in bf16, ≤ 0.002; in NF4, 0.08–0.13 on
    all-MiniLM-L6-v2 and up to 0.31 on a tiny random 64×160 layer (whose own NF4 error is 0.25);
    two unrelated weights of the same shape, ≥ 1.27.
    """
    weight = weight.reshape(-1, weight.shape[-1])  # a stack of expert weights is sketched as one tall matrix
    left, right = probe_matrices(*weight.shape, k)
    w = weight.detach().float()
    return left.to(w.device).T @ (w @ right.to(w.device))


def fingerprint_distance(saved: torch.Tensor, current: torch.Tensor) -> float:
    """Relative Frobenius distance between two fingerprints."""
    saved, current = saved.float(), current.float().to(saved.device)
    return float((saved - current).norm() / saved.norm().clamp_min(1e-30))
