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

Pure functions of floats and lists; no numpy, no torch. The study of ``examples/overoptimisation``
(:func:`study_point`, :func:`best_of_n_curve`, :func:`study_summary`, :func:`study_figure`) is assembled
here from its measured points, so that it can be tested and drawn by the run's report; only
:func:`study_figure` needs matplotlib (imported when it is called).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlhfkit.evaluate.metrics import mean_interval

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
        return _curve(self.form, self.alpha, self.beta, d)


def _d_squared(d: float) -> float:
    return d * d


def _d_log_d(d: float) -> float:
    return d * math.log(d) if d > 0 else 0.0  # the limit of d log d as d -> 0


def _penalty(form: FitForm) -> Callable[[float], float]:
    """``g(d)``, the term ``beta`` multiplies (with a minus sign)."""
    return {"best_of_n": _d_squared, "rl": _d_log_d}[form]


def _curve(form: FitForm, alpha: float, beta: float, d: float) -> float:
    """``R(d) = alpha * d - beta * g(d)``, Gao et al.'s gold-score curve of ``form``."""
    return alpha * d - beta * _penalty(form)(d)


def _sums_of_squares(values: Sequence[float], predictions: Sequence[float]) -> tuple[float, float]:
    """The residual and the total sum of squares of ``predictions`` of ``values`` (``r2 = 1 - res / tot``)."""
    residual = sum((y - f) ** 2 for y, f in zip(values, predictions, strict=True))
    mean = sum(values) / len(values)
    return residual, sum((y - mean) ** 2 for y in values)


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
    residual, spread = _sums_of_squares(gold, [_curve(form, alpha, beta, x) for x in d])
    r2 = 1.0 - residual / spread if spread > 0 else (1.0 if residual <= 1e-24 else float("nan"))
    peak = _peak(form, alpha, beta)
    value = None if peak is None else _curve(form, alpha, beta, peak)
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


# ---- the over-optimisation study (examples/overoptimisation/study.py): points, fits, figure ------------------

STUDY_PAPER = "Gao, Schulman & Hilton 2022, Scaling laws for reward model overoptimization (arXiv:2210.10760)"


def study_point(gold: Sequence[float], proxy: Sequence[float], kl: float, *, n_bootstrap: int = 1000,
                seed: int = 0, **labels: Any) -> dict[str, Any]:
    """One point of an over-optimisation study: a policy's per-prompt gold and proxy scores, and its KL.

    ``gold[i]`` / ``proxy[i]`` are the gold judge's and the reward model's score of the policy's completion of
    prompt ``i``; ``kl`` is ``KL(pi || pi_init)`` in nats (analytic for best-of-n, measured on samples for RL).
    Returns ``labels`` (``method="best_of_n", n=4``; ``method="ppo", kl_coef=0.1, iteration=20``;
    ``method="sft"``) with ``kl``, ``sqrt_kl`` (Gao et al.'s ``d``, from ``max(kl, 0)``: a KL estimated on
    samples can come out slightly below 0 near the initial policy), the mean ``gold`` with its
    percentile-bootstrap interval over prompts ``gold_low`` / ``gold_high``
    (:func:`~rlhfkit.evaluate.metrics.mean_interval`), the mean ``proxy``, ``prompts``, and ``gold_values``
    (the per-prompt gold scores: :func:`study_summary` pairs them between points, and leaves them out of its
    result).
    """
    if len(gold) != len(proxy):
        raise ValueError(f"{len(gold)} gold scores for {len(proxy)} proxy scores")
    if not gold:
        raise ValueError("a study point needs at least one prompt")
    if not math.isfinite(kl):
        raise ValueError(f"the KL must be a finite number, got {kl}")
    interval = mean_interval(gold, n_bootstrap=n_bootstrap, seed=seed)
    return {**labels, "kl": float(kl), "sqrt_kl": math.sqrt(max(float(kl), 0.0)), "gold": interval["mean"],
            "gold_low": interval["low"], "gold_high": interval["high"], "proxy": sum(proxy) / len(proxy),
            "prompts": len(gold), "gold_values": [float(g) for g in gold]}


def powers_of_two(max_n: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``max_n``, and ``max_n`` itself when it is no power of two."""
    if max_n < 1:
        raise ValueError(f"max_n must be at least 1, got {max_n}")
    ns = [1]
    while ns[-1] * 2 <= max_n:
        ns.append(ns[-1] * 2)
    return ns if ns[-1] == max_n else [*ns, max_n]


def best_of_n_curve(gold_per_prompt: Sequence[Sequence[float]], proxy_per_prompt: Sequence[Sequence[float]],
                    ns: Sequence[int] | None = None, *, extras: Mapping[str, Sequence[Sequence[float]]] | None = None,
                    n_bootstrap: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """The best-of-n points of Gao et al. 2022 from one draw of ``N`` samples per prompt.

    ``gold_per_prompt[i][j]`` and ``proxy_per_prompt[i][j]`` score draw ``j`` of prompt ``i``. For each ``n``
    of ``ns`` (default :func:`powers_of_two` up to the draws per prompt) the pick of prompt ``i`` is
    :func:`~rlhfkit.rollout.best_of_n.best_of_prefix` of its proxy scores: the highest-proxy sample among its
    first ``n`` draws (first on ties), a best-of-``n`` sample since the draws are independent. Each point
    (:func:`study_point`, ``method="best_of_n"``) holds the picks' mean gold with its bootstrap interval, their
    mean proxy, and the analytic ``KL = log n - (n - 1) / n`` (:func:`best_of_n_kl`). ``extras`` (name ->
    per-prompt, per-draw values such as the completions' lengths) adds the picks' mean of each under its name.
    """
    from rlhfkit.rollout.best_of_n import best_of_prefix  # the rollout package imports transformers

    if len(gold_per_prompt) != len(proxy_per_prompt):
        raise ValueError(f"{len(gold_per_prompt)} prompts of gold scores for {len(proxy_per_prompt)} of proxy scores")
    if not gold_per_prompt:
        raise ValueError("best_of_n_curve needs at least one prompt")
    for i, (gold, proxy) in enumerate(zip(gold_per_prompt, proxy_per_prompt, strict=True)):
        if len(gold) != len(proxy):
            raise ValueError(f"prompt {i}: {len(gold)} gold scores for {len(proxy)} proxy scores")
    drawn = min(len(proxy) for proxy in proxy_per_prompt)
    ns = list(ns) if ns is not None else powers_of_two(drawn)
    if drawn < 1 or any(not 1 <= n <= drawn for n in ns):
        raise ValueError(f"every n must be between 1 and the {drawn} draws of the prompt with the fewest, got {ns}")
    for name, values in (extras or {}).items():
        if [len(v) for v in values] != [len(p) for p in proxy_per_prompt]:
            raise ValueError(f"extras[{name!r}] must hold one value per draw of every prompt")
    points = []
    for n in ns:
        picks = [best_of_prefix(proxy, n) for proxy in proxy_per_prompt]
        means = {name: sum(v[i] for v, i in zip(values, picks, strict=True)) / len(picks)
                 for name, values in (extras or {}).items()}
        points.append(study_point([gold[i] for gold, i in zip(gold_per_prompt, picks, strict=True)],
                                  [proxy[i] for proxy, i in zip(proxy_per_prompt, picks, strict=True)],
                                  best_of_n_kl(n), n_bootstrap=n_bootstrap, seed=seed, method="best_of_n", n=n,
                                  **means))
    return points


def series_key(point: dict[str, Any]) -> str:
    """The series a study point belongs to: ``best_of_n``, ``ppo:kl_coef=<c>`` or ``sft``."""
    if point["method"] == "ppo":
        return f"ppo:kl_coef={point['kl_coef']:g}"
    return str(point["method"])


def _point_label(point: dict[str, Any]) -> str:
    if point["method"] == "best_of_n":
        return f"n={point['n']}"
    if point["method"] == "ppo":
        return f"iteration {point['iteration']}"
    return "SFT"


def _fit_entry(form: FitForm, points: Sequence[dict[str, Any]], baseline: float) -> dict[str, Any]:
    """A fit of ``gold - baseline`` against ``sqrt_kl`` as a json-ready dict (an ``error`` if it cannot be fitted)."""
    fit_function = fit_best_of_n if form == "best_of_n" else fit_rl
    max_kl = max(p["kl"] for p in points)
    try:
        fit = fit_function([p["sqrt_kl"] for p in points], [p["gold"] - baseline for p in points])
    except ValueError as error:
        return {"form": form, "points": len(points), "max_kl": max_kl, "error": str(error)}
    return {"form": form, "alpha": fit.alpha, "beta": fit.beta, "r2": fit.r2, "points": fit.points,
            "peak_d": fit.peak_d, "peak_kl": fit.peak_kl, "peak_value": fit.peak_value,
            "peak_gold": None if fit.peak_value is None else baseline + fit.peak_value, "max_kl": max_kl,
            "peak_in_range": fit.peak_kl is not None and fit.peak_kl <= max_kl}


def _predict(entry: dict[str, Any], d: float) -> float:
    """The gold score over the initial policy's at ``d`` of a :func:`_fit_entry` fit."""
    return _curve(entry["form"], entry["alpha"], entry["beta"], d)


def _goodness(points: Sequence[dict[str, Any]], predictions: Sequence[float], baseline: float,
              parameters: int) -> dict[str, Any]:
    """r2 and the adjusted r2 ``1 - (SS_res / (N - p)) / (SS_tot / (N - 1))`` of ``predictions`` of gold - baseline."""
    values = [p["gold"] - baseline for p in points]
    residual, spread = _sums_of_squares(values, predictions)
    n = len(values)
    r2 = 1 - residual / spread if spread > 0 else float("nan")
    adjusted = 1 - (residual / (n - parameters)) / (spread / (n - 1)) if spread > 0 and n > parameters else None
    return {"parameters": parameters, "points": n, "r2": r2, "adjusted_r2": adjusted}


def _verdict(points: Sequence[dict[str, Any]], n_bootstrap: int, seed: int) -> dict[str, Any]:
    """Where a series' gold peaks (the observed best point) and what gold and proxy do past it.

    ``points`` in the order of optimisation (best-of-n by ``n``, PPO by iteration). ``gold_drop`` is the
    best point's gold minus the last point's, with a paired bootstrap interval over prompts when both hold
    the same prompts' ``gold_values``; ``gold_falls_past_peak`` says its interval lies above 0 (the best
    point is picked on the same data, so this leans towards finding a drop: read it with the fit).
    ``proxy_rises_past_gold_peak``: the last point's proxy is above the best point's.
    """
    best = max(points, key=lambda p: p["gold"])  # the first on ties
    last = points[-1]
    entry: dict[str, Any] = {
        "best": _point_label(best), "best_kl": best["kl"], "best_gold": best["gold"], "best_proxy": best["proxy"],
        "last": _point_label(last), "last_kl": last["kl"], "last_gold": last["gold"], "last_proxy": last["proxy"],
        "gold_drop": best["gold"] - last["gold"], "gold_drop_low": None, "gold_drop_high": None,
        "gold_falls_past_peak": None, "proxy_change": last["proxy"] - best["proxy"],
        "proxy_rises_past_gold_peak": last["proxy"] > best["proxy"]}
    ours, theirs = best.get("gold_values"), last.get("gold_values")
    if best is last:
        entry.update(gold_drop_low=0.0, gold_drop_high=0.0, gold_falls_past_peak=False)
    elif ours and theirs and len(ours) == len(theirs):
        interval = mean_interval([a - b for a, b in zip(ours, theirs, strict=True)], n_bootstrap=n_bootstrap,
                                 seed=seed)
        entry.update(gold_drop_low=interval["low"], gold_drop_high=interval["high"],
                     gold_falls_past_peak=interval["low"] > 0)
    return entry


def study_summary(points: Sequence[dict[str, Any]], *, baseline_gold: float, baseline_proxy: float,
                  settings: dict[str, Any] | None = None, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The ``study.json`` of an over-optimisation study (Gao et al. 2022) from its :func:`study_point` points.

    ``points`` are best-of-n points (:func:`best_of_n_curve`), PPO checkpoints (``method="ppo"``, ``kl_coef``,
    ``iteration``) and at most one ``method="sft"`` point (the initial policy evaluated like the checkpoints:
    iteration 0 of every PPO series). ``baseline_gold`` / ``baseline_proxy`` are the initial policy's
    expected scores (``R(0)``): the fits take ``gold - baseline_gold`` (``R(0) = 0``) against ``d = sqrt_kl``.

    Returns ``paper``, ``settings``, ``baseline``, ``points`` (each with ``gold_delta = gold - baseline_gold``,
    without ``gold_values``), ``fits`` and ``series``:

    * ``fits.best_of_n``: ``R(d) = d (alpha - beta d)`` (:func:`fit_best_of_n`) to the best-of-n points;
    * ``fits.rl``: ``R(d) = d (alpha - beta log d)`` (:func:`fit_rl`) to the SFT point and every PPO checkpoint
      pooled (one curve: Gao et al. find that the KL penalty moves a run along the gold-vs-KL curve, like early
      stopping, rather than changing it); ``fits.rl_by_kl_coef``: one such fit per KL coefficient (the SFT point
      and that run's checkpoints); ``fits.rl_comparison``: r2 and adjusted r2 of the pooled fit (2 parameters)
      and of the per-coefficient fits together (2 per coefficient) over the same points, and the ``preferred``
      one by adjusted r2;
    * each fit: ``alpha``, ``beta``, ``r2``, the fitted peak ``peak_d`` / ``peak_kl`` / ``peak_value`` (over SFT)
      / ``peak_gold`` (absolute; ``None`` without an interior maximum), ``max_kl`` measured and ``peak_in_range``;
      or ``error`` when the points do not determine the curve;
    * ``series[name]`` (``best_of_n``, ``ppo:kl_coef=<c>``): the observed best point and the last one, the
      gold drop between them with a paired bootstrap interval, and whether the proxy still rose past the
      best point (:func:`_verdict`).
    """
    bon = sorted((p for p in points if p["method"] == "best_of_n"), key=lambda p: p["n"])
    sft = [p for p in points if p["method"] == "sft"]
    ppo = [p for p in points if p["method"] == "ppo"]
    if len(sft) > 1:
        raise ValueError(f"at most one sft point, got {len(sft)}")
    if any(p["method"] not in ("best_of_n", "sft", "ppo") for p in points):
        raise ValueError(f"unknown methods {sorted({p['method'] for p in points} - {'best_of_n', 'sft', 'ppo'})}")
    coefs = sorted({p["kl_coef"] for p in ppo})
    runs = {c: sft + sorted((p for p in ppo if p["kl_coef"] == c), key=lambda p: p["iteration"]) for c in coefs}
    fits: dict[str, Any] = {}
    series: dict[str, Any] = {}
    if bon:
        fits["best_of_n"] = _fit_entry("best_of_n", bon, baseline_gold)
        series["best_of_n"] = _verdict(bon, n_bootstrap, seed)
    if ppo:
        pooled = sft + ppo
        fits["rl"] = _fit_entry("rl", pooled, baseline_gold)
        fits["rl_by_kl_coef"] = {f"{c:g}": _fit_entry("rl", runs[c], baseline_gold) for c in coefs}
        comparison: dict[str, Any] = {}
        if "error" not in fits["rl"]:
            comparison["pooled"] = _goodness(pooled, [_predict(fits["rl"], p["sqrt_kl"]) for p in pooled],
                                             baseline_gold, 2)
        if all("error" not in entry for entry in fits["rl_by_kl_coef"].values()):
            by_coef = [_predict(fits["rl_by_kl_coef"][f"{p['kl_coef']:g}"], p["sqrt_kl"]) if p["method"] == "ppo"
                       else 0.0 for p in pooled]  # every curve passes through R(0) = 0, the SFT point's prediction
            comparison["by_kl_coef"] = _goodness(pooled, by_coef, baseline_gold, 2 * len(coefs))
        scored = {k: v["adjusted_r2"] for k, v in comparison.items() if v["adjusted_r2"] is not None}
        comparison["preferred"] = max(scored, key=scored.get) if scored else None
        fits["rl_comparison"] = comparison
        for c in coefs:
            series[f"ppo:kl_coef={c:g}"] = _verdict(runs[c], n_bootstrap, seed)
    kept = [{**{k: v for k, v in p.items() if k != "gold_values"}, "gold_delta": p["gold"] - baseline_gold}
            for p in [*bon, *sft, *(p for c in coefs for p in runs[c] if p["method"] == "ppo")]]
    return {"paper": STUDY_PAPER, "settings": dict(settings or {}),
            "baseline": {"gold": baseline_gold, "proxy": baseline_proxy}, "points": kept, "fits": fits,
            "series": series}


def _fit_label(name: str, entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{name}: no fit"
    peak = (f", peak KL {entry['peak_kl']:.2f}" if entry["peak_kl"] is not None and entry["peak_kl"] < 1e4
            else ", no peak" if entry["peak_kl"] is None else ", peak KL > 1e4")
    return f"{name}: α={entry['alpha']:.3f}, β={entry['beta']:.3f}, R²={entry['r2']:.2f}{peak}"


def study_figure(study: dict[str, Any]):
    """Gold (left) and proxy (right) score against ``d = sqrt(KL)`` of a :func:`study_summary` study, as Gao et
    al. 2022 draw them: best-of-n and each PPO KL coefficient as a series (gold with its 95 % bootstrap
    interval), the fitted gold curves (best-of-n and pooled RL dashed, per-coefficient RL dotted, each over its
    own points' range) with their peaks starred, SFT's expected scores as dotted lines, KL itself on the top
    axis. When PPO reaches far beyond best-of-n's KL, a second row zooms in on best-of-n's range, where the
    peaks are. A :class:`matplotlib.figure.Figure` built without pyplot."""
    from matplotlib.figure import Figure

    points = study["points"]
    bon_extent = max((p["sqrt_kl"] for p in points if p["method"] == "best_of_n"), default=0.0)
    full_extent = max((p["sqrt_kl"] for p in points), default=0.0)
    zoom = bon_extent * 1.25 if bon_extent > 0 and full_extent > 2 * bon_extent * 1.25 else None
    rows = 2 if zoom else 1
    figure = Figure(figsize=(12, 4.2 * rows + 1.4), layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False)
    for row, limit in enumerate([None, zoom][:rows]):
        _draw_study_row(axes[row][0], axes[row][1], study, limit, legend=row == rows - 1)
    prompts = max((p.get("prompts", 0) for p in points), default=0)
    figure.suptitle(f"Reward over-optimisation (Gao et al. 2022): {prompts} held-out prompts", fontsize=11)
    return figure


def _draw_study_row(gold_ax, proxy_ax, study: dict[str, Any], limit: float | None, *, legend: bool) -> None:
    """One row of :func:`study_figure`: every series and fit, over ``d <= limit`` (None: everything)."""
    import numpy as np

    points, baseline = study["points"], study["baseline"]["gold"]
    sft = [p for p in points if p["method"] == "sft"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        if point["method"] != "sft":
            groups.setdefault(series_key(point), []).append(point)
    coefs = sorted({p["kl_coef"] for p in points if p["method"] == "ppo"})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    colors = {"best_of_n": "black", **{f"ppo:kl_coef={c:g}": palette[i % len(palette)] for i, c in enumerate(coefs)}}
    for key, group in groups.items():
        if key == "best_of_n":
            group, label, marker = sorted(group, key=lambda p: p["n"]), "best-of-n", "s"
        else:
            group = sft + sorted(group, key=lambda p: p["iteration"])
            label, marker = f"PPO, KL coef {group[-1]['kl_coef']:g}", "o"
        x = [p["sqrt_kl"] for p in group]
        gold_ax.errorbar(x, [p["gold"] for p in group], yerr=[[p["gold"] - p["gold_low"] for p in group],
                                                               [p["gold_high"] - p["gold"] for p in group]],
                         fmt=f"{marker}-", color=colors[key], ms=4, lw=1.2, capsize=2, label=label)
        proxy_ax.plot(x, [p["proxy"] for p in group], f"{marker}-", color=colors[key], ms=4, lw=1.2, label=label)
    fits = study.get("fits", {})

    def extent(method: str, coef: str | None = None) -> float:
        return max((p["sqrt_kl"] for p in points if p["method"] == method
                    and (coef is None or f"{p['kl_coef']:g}" == coef)), default=0.0)

    curves = [(fits.get("best_of_n"), extent("best_of_n"), "black", "--", "best-of-n fit"),
              (fits.get("rl"), extent("ppo"), "0.45", "--", "RL fit (pooled)")]
    curves += [(entry, extent("ppo", c), colors[f"ppo:kl_coef={c}"], ":", f"RL fit, KL coef {c}")
               for c, entry in fits.get("rl_by_kl_coef", {}).items()]
    peaks = []
    for entry, reach, color, style, name in curves:
        if not entry or "error" in entry or reach <= 0:
            continue
        grid = np.linspace(0.0, reach * 1.15, 200)
        gold_ax.plot(grid, [baseline + _predict(entry, float(d)) for d in grid], style, color=color,
                     lw=1.6 if style == "--" else 1.0, label=_fit_label(name, entry))
        if entry["peak_d"] is not None and entry["peak_d"] <= reach * 1.15:
            gold_ax.plot([entry["peak_d"]], [entry["peak_gold"]], "*", color=color, ms=11, mec="white", mew=0.6)
            peaks.append((entry["peak_d"], entry["peak_gold"]))
    gold_ax.axhline(baseline, color="0.6", lw=0.8, ls=":", label=f"SFT (initial policy) {baseline:.3f}")
    proxy_ax.axhline(study["baseline"]["proxy"], color="0.6", lw=0.8, ls=":", label="SFT (initial policy)")
    shown = [p for p in points if limit is None or p["sqrt_kl"] <= limit]
    if shown:  # the axes follow the measured points (and the fitted peaks), not the fits' extrapolations
        low = min([p["gold_low"] for p in shown] + [g for d, g in peaks if limit is None or d <= limit])
        high = max([p["gold_high"] for p in shown] + [g for d, g in peaks if limit is None or d <= limit])
        gold_ax.set_ylim(low - 0.08 * (high - low or 1.0), high + 0.08 * (high - low or 1.0))
        low, high = min(p["proxy"] for p in shown), max(p["proxy"] for p in shown)
        proxy_ax.set_ylim(low - 0.08 * (high - low or 1.0), high + 0.08 * (high - low or 1.0))
    zoomed = "" if limit is None else f", zoomed to d <= {limit:.2f}"
    gold_ax.set_ylabel("gold score (gold judge)")
    gold_ax.set_title(f"gold: the human's judgement{zoomed}", fontsize=10)
    proxy_ax.set_ylabel("proxy score (reward model, normalised)")
    proxy_ax.set_title(f"proxy: the reward model optimised against{zoomed}", fontsize=10)
    for ax in (gold_ax, proxy_ax):
        ax.set_xlabel("d = sqrt(KL(policy || SFT))  [sqrt nats]")
        ax.set_xlim(0, limit)
        top = ax.secondary_xaxis("top", functions=(lambda d: np.square(d), lambda kl: np.sqrt(np.clip(kl, 0, None))))
        top.set_xlabel("KL [nats]", fontsize=8)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
