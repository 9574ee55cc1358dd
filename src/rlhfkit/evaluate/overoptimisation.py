"""Reward over-optimisation: the KL of best-of-n sampling, and the functional forms of Gao et al. 2022.

Gao, Schulman & Hilton 2022, "Scaling laws for reward model overoptimization" (arXiv:2210.10760), optimise a
policy against a proxy reward model and measure a gold reward model along the way. Written as functions
of ``d = sqrt(KL(pi || pi_init))`` and with the gold score measured relative to the initial policy
(``R(0) = 0``), the gold score follows

* best-of-n: ``R_bon(d) = d * (alpha - beta * d)``,
* RL (PPO):  ``R_rl(d)  = d * (alpha - beta * log d)``.

With ``beta > 0`` both rise, peak and fall: the proxy keeps improving while the gold score is
over-optimised. :func:`fit_best_of_n` and :func:`fit_rl` fit them by linear least squares, since both are
linear in ``(alpha, beta)``: ``R = alpha * f(d) - beta * g(d)`` with ``f(d) = d`` and ``g(d) = d**2`` or
``d * log d``. No intercept is fitted: ``R(0) = 0`` by construction, so points at ``d = 0`` are allowed and
count as ``0 = 0`` residuals in the fit (and in the spread of ``r2``).

Pure functions of floats and lists; no numpy, no torch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

FitForm = Literal["best_of_n", "rl"]


def best_of_n_kl(n: int) -> float:
    """The KL divergence of best-of-``n`` sampling from the policy it samples: ``log n - (n - 1) / n`` nats.

    The formula of Stiennon et al. 2020 ("Learning to summarize from human feedback"), which Gao et al. 2022
    use to put best-of-n on the same KL axis as RL. It is exact when the ``n``
    draws are almost surely distinct (a continuous reward, no ties); Beirami et al. 2024 ("Theoretical
    guarantees on the best-of-n alignment policy") show it is an upper bound in general. ``n = 1`` gives 0.
    """
    try:
        n = operator.index(n)  # an int (numpy's too), not a float
    except TypeError:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}") from None
    if n < 1:
        raise ValueError(f"best-of-n needs an integer n >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


@dataclass(frozen=True)
class OveroptimisationFit:
    """A fitted gold-score curve ``R(d)``, ``d = sqrt(KL)``, of one of Gao et al.'s two forms.

    ``form`` is ``"best_of_n"`` (``R = d * (alpha - beta * d)``) or ``"rl"`` (``R = d * (alpha - beta * log d)``).
    ``r2`` is the coefficient of determination over all the fitted points. ``peak_d`` / ``peak_kl`` /
    ``peak_value`` locate the maximum of the curve for ``d > 0``, or are ``None`` when it has no interior
    maximum (``beta <= 0``: the fit shows no over-optimisation yet; for best-of-n also ``alpha <= 0``: the
    curve only falls).
    """

    form: FitForm
    alpha: float
    beta: float
    r2: float
    points: int
    peak_d: float | None
    peak_kl: float | None
    peak_value: float | None

    def predict(self, d: float) -> float:
        """The fitted gold score at ``d = sqrt(KL)`` (``d >= 0``)."""
        if d < 0:
            raise ValueError(f"d = sqrt(KL) must be >= 0, got {d}")
        return self.alpha * d - self.beta * _penalty(self.form)(d)


def _d_squared(d: float) -> float:
    return d * d


def _d_log_d(d: float) -> float:
    return d * math.log(d) if d > 0 else 0.0  # the limit of d log d as d -> 0


def _penalty(form: FitForm) -> Callable[[float], float]:
    """``g(d)``, the term ``beta`` multiplies (with a minus sign)."""
    return {"best_of_n": _d_squared, "rl": _d_log_d}[form]


def _peak(form: FitForm, alpha: float, beta: float) -> float | None:
    """The ``d > 0`` where ``R'(d) = 0`` and ``R'' < 0``, or None.

    best-of-n: ``R' = alpha - 2 beta d`` -> ``d* = alpha / (2 beta)``, a maximum for ``beta > 0``, inside
    ``d > 0`` only when ``alpha > 0``. RL: ``R' = alpha - beta (log d + 1)`` -> ``d* = exp(alpha / beta - 1)``,
    a maximum for ``beta > 0`` (``R'' = -beta / d``), always at ``d > 0``.
    """
    if beta <= 0:
        return None
    if form == "best_of_n":
        return alpha / (2 * beta) if alpha > 0 else None
    exponent = alpha / beta - 1
    return math.exp(exponent) if exponent < 700 else None  # beyond exp's range: no peak in any measurable KL


def _fit(form: FitForm, d: Sequence[float], gold: Sequence[float]) -> OveroptimisationFit:
    d, gold = [float(x) for x in d], [float(y) for y in gold]
    if len(d) != len(gold):
        raise ValueError(f"{len(d)} values of d for {len(gold)} gold scores")
    if not all(math.isfinite(x) for x in d + gold):
        raise ValueError("d and gold must be finite numbers")
    if any(x < 0 for x in d):
        raise ValueError(f"d = sqrt(KL) must be >= 0, got {min(d)}")
    if sum(x > 0 for x in d) < 2:
        raise ValueError(f"fitting the {form} curve needs at least 2 points with d > 0 (two unknowns, alpha "
                         f"and beta); got {sum(x > 0 for x in d)}")
    # R = alpha * u - beta * v: least squares in (alpha, beta) via the 2x2 normal equations (Cramer's rule)
    g = _penalty(form)
    u, v = d, [g(x) for x in d]
    suu = sum(a * a for a in u)
    svv = sum(b * b for b in v)
    suv = sum(a * b for a, b in zip(u, v, strict=True))
    suy = sum(a * y for a, y in zip(u, gold, strict=True))
    svy = sum(b * y for b, y in zip(v, gold, strict=True))
    det = suu * svv - suv * suv  # >= 0 (Cauchy-Schwarz); 0 when u and v are proportional over the points
    if det <= 1e-12 * suu * svv:
        raise ValueError(f"the points do not determine alpha and beta of the {form} curve (for rl: the points "
                         "with d > 0 must not all lie at d = 1, where log d = 0; use at least 2 distinct d > 0)")
    alpha = (suy * svv - svy * suv) / det
    beta = -(svy * suu - suy * suv) / det  # the coefficient of v is -beta
    residual = sum((y - (alpha * a - beta * b)) ** 2 for a, b, y in zip(u, v, gold, strict=True))
    mean = sum(gold) / len(gold)
    spread = sum((y - mean) ** 2 for y in gold)
    r2 = 1.0 - residual / spread if spread > 0 else (1.0 if residual <= 1e-24 else float("nan"))
    peak = _peak(form, alpha, beta)
    value = None if peak is None else alpha * peak - beta * g(peak)
    return OveroptimisationFit(form=form, alpha=alpha, beta=beta, r2=r2, points=len(d), peak_d=peak,
                               peak_kl=None if peak is None else peak * peak, peak_value=value)


def fit_best_of_n(d: Sequence[float], gold: Sequence[float]) -> OveroptimisationFit:
    """Fit ``R(d) = d * (alpha - beta * d)`` (Gao et al. 2022, best-of-n) by least squares.

    ``d[i] = sqrt(KL)`` of a point (for best-of-n, ``sqrt(best_of_n_kl(n))``) and ``gold[i]`` its gold score
    minus the initial policy's (so that ``R(0) = 0``). Needs at least 2 points with ``d > 0``. The peak is at
    ``d* = alpha / (2 beta)``, ``KL* = d*^2``, with value ``alpha^2 / (4 beta)``.
    """
    return _fit("best_of_n", d, gold)


def fit_rl(d: Sequence[float], gold: Sequence[float]) -> OveroptimisationFit:
    """Fit ``R(d) = d * (alpha - beta * log d)`` (Gao et al. 2022, RL) by least squares.

    ``d[i] = sqrt(KL)`` of a point (e.g. a PPO checkpoint's KL to the initial policy) and ``gold[i]`` its
    gold score minus the initial policy's. Needs at least 2 points with ``d > 0``, not all at ``d = 1``.
    The peak is at ``d* = exp(alpha / beta - 1)``, with value ``beta * d*``.
    """
    return _fit("rl", d, gold)
