"""The implicit form of FuRA: applying and merging the block transform ``M``, with autograd nodes that keep no copy.

`fura.blocks` builds the tensors; this module computes with them. ``apply_fura_transform`` applies
``blockdiag(M)`` to activations (the forward of a dense layer), ``adapted_stack`` to a stack of expert weights,
and ``merge_into`` merges it into a weight. Autograd keeps only tensors that exist anyway (the input or the base
weight, and the small factors); ``M`` is recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fura.blocks import block_transform


def _blocks_first(x: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """(T, n·b) → (n, T, b): a strided view, no copy. BLAS takes the row stride n·b as its leading dimension."""
    return x.reshape(-1, n, b).transpose(0, 1)


def _block_matmul(x: torch.Tensor, weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """(T, n·b) → (T, n·b): block j of the result is ``x_j · W_j``, or ``x_j · W_jᵀ`` with ``transpose``.

    One ``bmm`` reads the blocks of ``x`` and writes the blocks of the result in place, through
    strided views. It makes no layout copy of the activation (on a CPU such a copy cost more than
    the product) and no launch per block (a loop of ``mm`` paid one each);
    ``benchmarks/kernel_bench.py`` measures the three.
    """
    n, b, _ = weight.shape
    weight = weight.transpose(1, 2) if transpose else weight
    if torch.compiler.is_compiling():  # the compiler picks its own layouts, and a strided out= breaks its graph
        return torch.bmm(_blocks_first(x, n, b), weight).transpose(0, 1).reshape(x.shape)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.bmm(_blocks_first(x, n, b), weight, out=_blocks_first(out, n, b))
    return out


def _block_gram(x: torch.Tensor, grad: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """(n, b, b) with block j equal to ``x_jᵀ · grad_j``, the gradient of ``x_j · W_j`` with respect to W_j."""
    return torch.bmm(_blocks_first(x, n, b).transpose(1, 2), _blocks_first(grad, n, b))


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul on ``x`` in: its lower precision when enabled, else ``x``'s own."""
    kind = x.device.type
    if x.dtype != torch.float64 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _FuraTransform(torch.autograd.Function):
    """``y = x · blockdiag(M)ᵀ`` (or ``x · blockdiag(M)``) with ``M = B·diag(σ)·R``, in one autograd node.

    ``B`` is the frozen left factor that stands for L (`fura.blocks`), ``R`` the trainable small core.

    Autograd keeps only tensors that exist anyway: the input and the small B, σ and R. M itself is
    recomputed in backward (n·b³ flops), so no activation-sized or M-sized tensor is saved.
    """

    @staticmethod
    def forward(ctx, x, left_factor, sigma, right, transpose: bool):
        transform = block_transform(left_factor, right, sigma)
        # Autocast does not cast a product written through out=, so cast here as it would.
        flat = x.reshape(-1, x.shape[-1]).to(_autocast_dtype(x))
        # y_j = M_j x_j as rows: x_j · M_jᵀ; with transpose, y_j = M_jᵀ x_j, i.e. x_j · M_j.
        y = _block_matmul(flat, transform.to(flat.dtype), transpose=not transpose)
        ctx.save_for_backward(x, left_factor, sigma, right)
        ctx.transpose = transpose
        ctx.compute_dtype = y.dtype  # bf16 under autocast: backward computes in the forward's precision
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        x, left_factor, sigma, right = ctx.saved_tensors
        n, b, _ = left_factor.shape
        dtype = ctx.compute_dtype
        scaled = left_factor if sigma is None else left_factor * sigma.unsqueeze(1)  # B·diag(σ)
        grad = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        grad_x = grad_left_factor = grad_sigma = grad_right = None
        if ctx.needs_input_grad[0]:
            transform = torch.bmm(scaled, right).to(dtype)  # M, recomputed rather than saved
            grad_x = _block_matmul(grad, transform, transpose=ctx.transpose).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # y_j = x_j · W_j with W_j = M_jᵀ (or M_j with transpose): dL/dW_j = x_jᵀ g_j.
            grad_w = _block_gram(x.reshape(-1, x.shape[-1]).to(dtype), grad, n, b).to(right.dtype)
            grad_m = grad_w if ctx.transpose else grad_w.transpose(1, 2)
            grad_sigma, grad_right = _factor_grads(grad_m, left_factor, sigma, right, scaled, ctx.needs_input_grad[2:4])
        return grad_x, grad_left_factor, grad_sigma, grad_right, None


def _factor_grads(
    grad_m: torch.Tensor,
    left_factor: torch.Tensor,
    sigma: torch.Tensor | None,
    right: torch.Tensor,
    scaled: torch.Tensor,
    needed: tuple[bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of σ and R from the gradient of ``M = B·diag(σ)·R`` (``scaled`` is ``B·diag(σ)``), where needed."""
    grad_sigma = grad_right = None
    if needed[1]:
        grad_right = torch.bmm(scaled.transpose(1, 2), grad_m)
    if sigma is not None and needed[0]:
        grad_sigma = (torch.bmm(grad_m, right.transpose(1, 2)) * left_factor).sum(dim=1)
    return grad_sigma, grad_right


def apply_fura_transform(
    x: torch.Tensor,
    left_factor: torch.Tensor,
    sigma: torch.Tensor | None,
    right: torch.Tensor,
    transpose: bool = False,
) -> torch.Tensor:
    """Apply ``blockdiag(M)``, ``M = B·diag(σ)·R``, to the last dimension of ``x``: ``y_j = M_j x_j`` (or ``M_jᵀ x_j``).

    This is the FuRA forward on the side that carries the blocks. It is differentiable in R and σ,
    and autograd keeps no copy of the activation (see `_FuraTransform`).
    """
    return _FuraTransform.apply(x, left_factor, sigma, right, transpose)


def merge_into(blocked: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``A0 · blockdiag(M)``: the merged blocked weight, ``A[:, j] = A0[:, j] · M_j``.

    A stack of blocked weights (E, rows, cols) takes the E·n transforms of `block_svd`'s expert-major order (not
    differentiable: `adapted_stack` is the training form).
    """
    if blocked.ndim == 3:
        per_block = _by_expert(transform.to(blocked.dtype), blocked.shape[0])
        out = torch.empty(blocked.shape, dtype=blocked.dtype, device=blocked.device)
        return _stack_blocks(blocked, lambda j: per_block[:, j], out)
    rows, cols = blocked.shape
    n, b, _ = transform.shape
    out = torch.bmm(blocked.reshape(rows, n, b).transpose(0, 1), transform)  # (n, rows, b)
    return out.transpose(0, 1).reshape(rows, cols)


def _stack_blocks(
    blocked: torch.Tensor, transform: Callable[[int], torch.Tensor], out: torch.Tensor, transpose: bool = False
) -> torch.Tensor:
    """``out[e][:, j] = blocked[e][:, j] · M_ej`` (or ``M_ejᵀ``) for a stack (E, rows, n·b); returns ``out``.

    ``transform(j)`` gives block column j's transforms of every expert, (E, b, b). One ``bmm`` per block column,
    batched over the stack, reads and writes strided views as `_block_matmul` does: no copy of the blocked
    weight, whatever its layout (a transposed gpt-oss stack included).
    """
    first = transform(0)
    b = first.shape[-1]
    for j in range(blocked.shape[-1] // b):
        m = transform(j) if j else first
        torch.bmm(blocked[..., j * b : (j + 1) * b], m.mT if transpose else m, out=out[..., j * b : (j + 1) * b])
    return out


def _by_expert(tensor: torch.Tensor, stack: int) -> torch.Tensor:
    """(E·n, …) in `block_svd`'s expert-major order → (E, n, …), a view."""
    return tensor.reshape(stack, -1, *tensor.shape[1:])


class _FuraStack(torch.autograd.Function):
    """``A0 · blockdiag(M)`` for a stack of blocked weights (a Mixture-of-Experts parameter), in one node.

    ``M = B·diag(σ)·R``. Autograd keeps the blocked weight (the base parameter itself, not a copy) and the small
    B, σ and R; M is recomputed in backward. So the adapted stack costs the memory of its result only, which the
    experts' product keeps anyway. The M's and their gradient exist only as transients the size of R, built with
    one batched product each: per block column they would cost a few dozen small kernel launches more per step on
    a CPU.
    """

    @staticmethod
    def forward(ctx, blocked, left_factor, sigma, right):
        per_block = _by_expert(block_transform(left_factor, right, sigma).to(blocked.dtype), blocked.shape[0])
        ctx.save_for_backward(blocked, left_factor, sigma, right)
        out = torch.empty(blocked.shape, dtype=blocked.dtype, device=blocked.device)
        return _stack_blocks(blocked, lambda j: per_block[:, j], out)

    @staticmethod
    def backward(ctx, grad):
        blocked, left_factor, sigma, right = ctx.saved_tensors
        stack, b = blocked.shape[0], left_factor.shape[1]
        scaled = left_factor if sigma is None else left_factor * sigma.unsqueeze(1)  # B·diag(σ)
        grad = grad.to(blocked.dtype)
        grad_blocked = grad_sigma = grad_right = None
        if ctx.needs_input_grad[0]:  # a second adapter's blocked weight is the first one's output
            per_block = _by_expert(torch.bmm(scaled, right).to(grad.dtype), stack)
            grad_blocked = _stack_blocks(grad, lambda j: per_block[:, j], torch.empty_like(grad), transpose=True)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            # out_j = A0_j · M_j, so dL/dM_j = A0_jᵀ · G_j: one bmm per block column, batched over the stack.
            grad_m = torch.empty(stack, blocked.shape[-1] // b, b, b, dtype=grad.dtype, device=grad.device)
            for j in range(grad_m.shape[1]):
                columns = slice(j * b, (j + 1) * b)
                torch.bmm(blocked[..., columns].mT, grad[..., columns], out=grad_m[:, j])
            grad_m = grad_m.reshape(-1, b, b).to(right.dtype)
            grad_sigma, grad_right = _factor_grads(grad_m, left_factor, sigma, right, scaled, ctx.needs_input_grad[2:4])
        return grad_blocked, None, grad_sigma, grad_right


def adapted_stack(
    blocked: torch.Tensor, left_factor: torch.Tensor, sigma: torch.Tensor | None, right: torch.Tensor
) -> torch.Tensor:
    """``A0 · blockdiag(M)`` for a stack of blocked weights (E, rows, n·b), differentiable in R and σ (`_FuraStack`).

    The transforms come in `block_svd`'s expert-major order (E·n, b, b); the result is in ``blocked``'s dtype.
    """
    return _FuraStack.apply(blocked, left_factor, sigma, right)
