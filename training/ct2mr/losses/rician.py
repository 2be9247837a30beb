"""Rician noise model of magnitude MR (thesis section 8, perspective P2; eqs. 8.1-8.5).

The networks see MR intensities in [-1, 1]; the Rician terms work in the thesis's magnitude domain [0, 1]
(section 8: "intensities are mapped to [0, 1] for these terms"): ``s = (v + 1) / 2``. Noise levels ``sigma`` are
therefore fractions of the full normalised MR range (sigma = 0.05 is 5 % of the 1st-99th percentile window).

* :func:`rician_corrupt` (eq. 8.1): ``R_sigma(v) = 2 * sqrt((s + n1)^2 + n2^2) - 1`` with n1, n2 ~ N(0, sigma^2),
  applied to *both* real and synthetic MR before D_MR, sigma drawn per sample.
* :func:`rician_nll` (eqs. 8.2-8.3): negative log-likelihood of a magnitude observation under Rice(nu, sigma).
* :func:`rician_mixed_loss` (eqs. 8.4-8.5): L1 mixed with the Rician NLL for the MR identity and MR cycle terms.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["rician_corrupt", "rician_nll", "rician_mixed_loss", "log_i0"]

_REDUCTIONS = ("mean", "sum", "none")


def log_i0(z: torch.Tensor) -> torch.Tensor:
    """log I0(z) of the modified Bessel function of the first kind, order 0, stable for large z.

    Uses ``log(i0e(z)) + |z|`` (``torch.special.i0e(z) = exp(-|z|) I0(z)``), which never overflows.
    """
    return torch.log(torch.special.i0e(z)) + z.abs()


def _sigma_tensor(sigma: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if bool((s <= 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("sigma (Rician noise level on the [0, 1] magnitude scale) must be finite and > 0.")
    return s


def rician_corrupt(y: torch.Tensor, sigma_range: Sequence[float] = (0.0, 0.1),
                   generator: torch.Generator | None = None, sigma: float | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Rician forward model R_sigma (thesis eq. 8.1), on the [-1, 1] scale of the networks.

    ``s = (y + 1) / 2`` (magnitude in [0, 1]); ``m = sqrt((s + n1)^2 + n2^2)`` with independent n1, n2 ~ N(0,
    sigma^2) per voxel; returns ``2 m - 1``. One sigma ~ U(sigma_range) is drawn per batch item. The result is not
    clipped (noise can push values slightly above 1, as real magnitude noise would); a 1e-12 under the square
    root keeps gradients finite where the magnitude is 0. Differentiable with respect to ``y``, so it can sit
    between G and D_MR.

    Args:
        y: MR volumes (B, C, D, H, W) in [-1, 1] (real MR or G(x)).
        sigma_range: (low, high) of the per-sample noise level on the [0, 1] magnitude scale, 0 <= low <= high.
        generator: optional ``torch.Generator`` for sigma and the noise; numbers are drawn on its device and moved
            to ``y``'s (a CPU generator gives the same noise on any device).
        sigma: fixed noise level instead of drawing one: a float or a tensor broadcastable to (B, 1, 1, 1, 1).

    Returns:
        Tensor of the shape and dtype of ``y``, values >= -1.

    Raises:
        ValueError: invalid ``sigma_range`` or a negative ``sigma``.
    """
    draw_on = generator.device if generator is not None else y.device
    if sigma is None:
        if len(sigma_range) != 2 or not 0.0 <= float(sigma_range[0]) <= float(sigma_range[1]):
            raise ValueError(f"sigma_range must be (low, high) with 0 <= low <= high, got {sigma_range}.")
        lo, hi = float(sigma_range[0]), float(sigma_range[1])
        u = torch.rand((y.shape[0],) + (1,) * (y.ndim - 1), generator=generator, device=draw_on).to(y.device)
        sig = lo + (hi - lo) * u
    else:
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=y.device)
        if bool((sig < 0).any()):
            raise ValueError(f"sigma must be >= 0, got {sigma}.")
    s = (y.float() + 1.0) / 2.0
    n1 = torch.randn(s.shape, generator=generator, device=draw_on).to(y.device) * sig
    n2 = torch.randn(s.shape, generator=generator, device=draw_on).to(y.device) * sig
    m = torch.sqrt((s + n1) ** 2 + n2 ** 2 + 1e-12)
    return (2.0 * m - 1.0).to(y.dtype)


def rician_nll(x: torch.Tensor, nu: torch.Tensor, sigma: float | torch.Tensor, constants: bool = True,
               reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood of magnitudes ``x >= 0`` under Rice(nu, sigma) (thesis eqs. 8.2-8.3).

    With z = x nu / sigma^2 and a stable log I0 (:func:`log_i0`):

    * ``constants=True``: the exact ``-log p(x | nu, sigma) = -log x + 2 log sigma + (x^2 + nu^2) / (2 sigma^2)
      - log I0(z)``, equal to ``-scipy.stats.rice.logpdf(x, nu / sigma, scale=sigma)``; +inf where x = 0.
    * ``constants=False``: eq. 8.3, ``nu^2 / (2 sigma^2) - log I0(z)``, which drops the terms that do not
      depend on nu (same gradient with respect to nu, finite at x = 0). Use it as a training loss.

    Args:
        x: observed magnitudes (any shape, e.g. (B, 1, D, H, W)) on the [0, 1] scale, >= 0.
        nu: predicted noise-free signal (e.g. G(y) mapped to [0, 1]), broadcastable to ``x``.
        sigma: noise level > 0, a float or a tensor broadcastable to ``x``.
        constants: see above.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (elementwise).

    Returns:
        Float32 tensor: a scalar, or elementwise for ``"none"``.

    Raises:
        ValueError: negative ``x``, ``sigma <= 0``, or an unknown reduction.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Unknown reduction {reduction!r}; choose one of {_REDUCTIONS}.")
    x, nu = x.float(), nu.float()
    if bool((x < 0).any()):
        raise ValueError("Rician observations x must be >= 0 (magnitudes on the [0, 1] scale).")
    s2 = _sigma_tensor(sigma, x) ** 2
    nll = nu * nu / (2 * s2) - log_i0(x * nu / s2)
    if constants:
        nll = nll - torch.log(x) + torch.log(s2) + x * x / (2 * s2)
    if reduction == "mean":
        return nll.mean()
    if reduction == "sum":
        return nll.sum()
    return nll


def rician_mixed_loss(pred: torch.Tensor, target: torch.Tensor, sigma: float | torch.Tensor, tau: float
                      ) -> torch.Tensor:
    """MR identity / MR cycle term mixing L1 and the Rician NLL (thesis eqs. 8.4-8.5).

    ``(1 - tau) * E|pred - target|_1 + tau * E L_Ric(nu = (pred + 1) / 2; x = (target + 1) / 2, sigma)``, where the
    L1 is on the [-1, 1] scale (exactly the identity / cycle L1 of eqs. 6.6-6.7, so tau = 0 reproduces them) and
    L_Ric is eq. 8.3 (``rician_nll(..., constants=False)``) on the [0, 1] magnitude scale. Note: tau weights the
    Rician term here, while eqs. 8.4-8.5 write tau on the L1 term; ``tau_here = 1 - tau_thesis``. The NLL's scale
    grows like 1 / sigma^2 and it is not zero at its minimum: choose tau accordingly (small, e.g. 0.01-0.1).

    Args:
        pred: G(y) (identity) or G(F(y)) (cycle), (B, 1, D, H, W) in [-1, 1].
        target: the real MR y, same shape, in [-1, 1] (values below -1 are clamped to magnitude 0).
        sigma: noise level > 0 on the [0, 1] scale (float or tensor broadcastable to (B, 1, 1, 1, 1)).
        tau: weight of the Rician term in [0, 1].

    Returns:
        Scalar tensor.

    Raises:
        ValueError: ``tau`` outside [0, 1], ``sigma <= 0`` or shape mismatch.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau (weight of the Rician NLL) must be in [0, 1], got {tau}.")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}.")
    l1 = (pred - target).abs().mean()
    if tau == 0.0:
        _sigma_tensor(sigma, pred)
        return l1
    x = ((target.detach().float() + 1.0) / 2.0).clamp_min(0.0)
    nu = (pred.float() + 1.0) / 2.0
    return (1.0 - tau) * l1 + tau * rician_nll(x, nu, sigma, constants=False)
