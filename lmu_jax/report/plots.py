"""The report's figures (matplotlib, Agg backend), each saved as PNG and SVG.

- ``loss_vs_tokens``: training curves per family and size, log-log;
- ``loss_vs_flops``: the same curves against training FLOPs, each family's compute frontier (final
  losses of horizon-matched runs) and the power law fitted to it;
- ``loss_vs_params``: final validation loss against N with the fitted L(N) per family and budget, and
  beside it the LMU paper's published fits as reference *shapes* (nats per GPT-2 BPE token on OWT2,
  not comparable in level with our losses);
- ``per_position``: validation loss by position in the context window (the LMU paper's Fig. 4);
- ``isoflop``: each budget's profile with its parabola and minimum, and N_opt(C) with the fitted line,
  its band and Chinchilla's a ≈ 0.50 beside it.

A fit that is not identified (``identified`` False) is never drawn as a law, and no fitted curve is
drawn past ``EXTRAPOLATION`` times the range of the data it was fitted to.

Every figure states the FLOP convention or the units it uses. Families keep one colour family across
figures; darker shades are larger models.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from lmu_jax.report.runs import budgets_in_order  # noqa: E402

EXTRAPOLATION = 2.0  # fitted curves are drawn from min/2 to max*2 of their own data, never further

# SVG text stays text (searchable, selectable, smaller) rather than glyph outlines
STYLE = {"svg.fonttype": "none"}

FLOP_CONVENTION = "training FLOPs = 3 × analytic forward (matmuls, causal attention, LMU memory), per token × tokens"
FAMILY_COLORMAPS = {"transformer": "Blues", "lstm": "Oranges", "lmu": "Greens", "lmu_attn": "Purples",
                    "transformer_xl": "Reds", "qrnn_hybrid": "YlOrBr", "multiscale": "Greys", "sch_txl": "RdPu"}
FAMILY_LABELS = {"transformer": "Transformer", "lstm": "LSTM", "lmu": "LMU", "lmu_attn": "LMU + attention",
                 "transformer_xl": "Transformer-XL", "sch_txl": "SCH-TXL", "qrnn_hybrid": "QRNN hybrid",
                 "multiscale": "Multi-scale"}
PAPER_CURVES = {  # key of lmu_jax.scaling.laws.LMU_PAPER_FITS -> (label, family whose colour it takes, style)
    "lmu": ("LMU (paper fit)", "lmu", "-"),
    "lmu_attn": ("LMU + global attention (paper fit)", "lmu_attn", "-"),
    "transformer_S25k": ("Transformer, eq. 12, S = 25k (Kaplan)", "transformer", "-"),
    "transformer_S250k": ("Transformer, eq. 12, S = 250k (Kaplan)", "transformer", ":"),
    "lstm": ("LSTM (Kaplan, 10× steps)", "lstm", "-"),
}


def label(family: str) -> str:
    return FAMILY_LABELS.get(family, family)


def family_color(family: str, shade: float = 0.75):
    """A colour of the family's colormap; shade in (0, 1], larger = darker."""
    cmap = plt.get_cmap(FAMILY_COLORMAPS.get(family, "Greys"))
    return cmap(0.35 + 0.6 * shade)


def size_shades(values) -> dict:
    """Map each distinct value (e.g. N) to a shade: smallest lightest, largest darkest."""
    distinct = sorted(set(values))
    if len(distinct) == 1:
        return {distinct[0]: 0.75}
    return {v: i / (len(distinct) - 1) for i, v in enumerate(distinct)}


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (minibatch losses are noisy); the first points average what exists."""
    if window <= 1 or len(values) < 2:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumulative[idx] - cumulative[lo]) / (idx - lo)


def log_binned(per_position, bins: int = 24):
    """Mean loss over log-spaced bins of positions 1..n (few windows make single positions noisy),
    placed at each bin's geometric centre: readable on a log position axis."""
    values = np.asarray(per_position, dtype=float)
    edges = np.unique(np.geomspace(1, len(values) + 1, bins + 1).astype(int))
    centres = np.sqrt(edges[:-1] * (edges[1:] - 1).clip(min=edges[:-1]))
    means = np.array([values[lo - 1:hi - 1].mean() for lo, hi in zip(edges[:-1], edges[1:])])
    return centres, means


def save(fig, out_dir, stem: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.svg"]
    with plt.rc_context(STYLE):
        fig.savefig(paths[0], dpi=130, bbox_inches="tight")
        fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _by_family(results):
    families: dict = {}
    for r in results:
        families.setdefault(r.family, []).append(r)
    return families


def _curve_window(result) -> int:
    return max(1, len(result.train_loss) // 25)


# --------------------------------------------------------------------------------------- figures


def loss_vs_tokens(results, out_dir) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family, runs in _by_family(results).items():
        shades = size_shades(r.N for r in runs)
        for r in sorted(runs, key=lambda r: (r.N, r.D)):
            color = family_color(family, shades[r.N])
            ax.plot(r.tokens, smooth(r.train_loss, _curve_window(r)), color=color, lw=1.3,
                    label=f"{label(family)} N={r.N:,}")
            ax.plot(r.eval_tokens, r.eval_loss, "o", color=color, ms=4)
    log_axes(ax)
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss vs tokens (lines: training loss, moving average; dots: validation)", fontsize=10)
    _legend(ax)
    return save(fig, out_dir, "loss_vs_tokens")


def loss_vs_flops(results, frontiers: dict, out_dir) -> list[Path]:
    """``frontiers``: family -> {"C": array, "loss": array, "fit": PowerLawFit | None}."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    skipped = []
    for family, runs in _by_family(results).items():
        shades = size_shades(r.N for r in runs)
        for r in sorted(runs, key=lambda r: (r.N, r.D)):
            ax.plot(r.flops, smooth(r.train_loss, _curve_window(r)), color=family_color(family, shades[r.N]),
                    lw=0.9, alpha=0.6)
            ax.plot([r.C], [r.val_loss], "o", color=family_color(family, shades[r.N]), ms=5)
        front = frontiers.get(family)
        if front is None:
            continue
        color = family_color(family, 1.0)
        ax.plot(front["C"], front["loss"], "-", color=color, lw=2.2, marker="D", ms=5,
                label=f"{label(family)} frontier")
        fit = front.get("fit")
        if fit is not None and not fit.identified:
            skipped.append(f"{label(family)} L(C) frontier")
        if fit is not None and fit.identified:
            span = fit_span(front["C"])
            ax.plot(span, fit.predict(span), "--", color=color, lw=1.2,
                    label=f"{label(family)} fit: {_law_text(fit, 'C')}")
    if skipped:
        ax.text(0.02, 0.02, "not identified, so not drawn: " + ", ".join(skipped), transform=ax.transAxes,
                fontsize=7, color="0.3")
    log_axes(ax)
    ax.set_xlabel("training FLOPs C (our convention)")
    ax.set_ylabel("loss (nats/token)")
    curves = "curves: training loss; " if any(r.flops.size for r in results) else ""
    ax.set_title(f"Loss vs training FLOPs ({curves}dots: final validation)\n" + FLOP_CONVENTION, fontsize=9)
    _legend(ax)
    return save(fig, out_dir, "loss_vs_flops")


def loss_vs_params(results, fits: list, out_dir) -> list[Path]:
    """``fits``: dicts {family, budget, fit (PowerLawFit), N (array of the points used)}."""
    from lmu_jax.scaling.laws import LMU_PAPER_FITS

    fig, (ax, ref) = plt.subplots(1, 2, figsize=(12, 5))
    budgets = budgets_in_order(results)
    markers = dict(zip(budgets, "osD^v<>p*h"))
    for family, runs in _by_family(results).items():
        for budget in budgets:
            points = sorted((r for r in runs if r.budget_key == budget), key=lambda r: r.N)
            if points:
                ax.plot([r.N for r in points], [r.val_loss for r in points], markers[budget] + "-",
                        color=family_color(family), ms=6, lw=0.6, label=f"{label(family)}, {budget}")
    skipped = []
    for entry in fits:
        fit, color = entry["fit"], family_color(entry["family"], 1.0)
        if not fit.identified:
            skipped.append(f"{label(entry['family'])} {entry['kind']}")
            continue
        span = fit_span(entry["N"])
        if hasattr(fit, "beta"):  # an L(N, D) fit: draw its data-unlimited limit E + A / N^alpha
            ax.plot(span, fit.E + fit.A * span**-fit.alpha, ":", color=color, lw=1.4,
                    label=f"{label(entry['family'])} L(N, D→∞): {_law_text(fit, 'N')}")
        else:
            ax.plot(span, fit.predict(span), "--", color=color, lw=1.2,
                    label=f"{label(entry['family'])} L(N), {entry['scope']}: {_law_text(fit, 'N')}")
    if skipped:
        ax.text(0.02, 0.98, "not identified, so not drawn:\n" + "\n".join(skipped), transform=ax.transAxes,
                va="top", fontsize=7, color="0.3")
    log_axes(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("L(N) of this sweep: final losses of horizon-matched runs\n"
                 "(at a FLOP budget the points are an isoFLOP profile, not a power law in N)", fontsize=9)
    _legend(ax)

    ours = [r.N for r in results] or [5.5e4]
    span = np.geomspace(min(min(ours), 5.5e4) / 1.2, max(max(ours), 1e6) * 1.2, 200)
    for key, (text, family, style) in PAPER_CURVES.items():
        ref.plot(span, LMU_PAPER_FITS[key](span), style, color=family_color(family, 0.9), lw=1.6, label=text)
    ref.axvspan(5.5e4, 1e6, color="0.9", zorder=0, label="N range the paper fitted")
    log_axes(ref)
    ref.set_xlabel("non-embedding parameters N")
    ref.set_ylabel("loss (nats per GPT-2 BPE token)")
    ref.set_title("Reference shapes: the LMU paper's published fits (OWT2, GPT-2 BPE)\n"
                  "not comparable in level with byte-level losses", fontsize=9)
    ref.legend(fontsize=7)
    return save(fig, out_dir, "loss_vs_params")


def per_position(results, out_dir) -> list[Path]:
    """Loss by position: every run thin, each family's largest model (at its largest budget) bold."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for family, runs in _by_family(results).items():
        shades = size_shades(r.N for r in runs)
        best = max(runs, key=lambda r: (r.N, r.C))
        for r in runs:
            positions, loss = log_binned(r.per_position_loss)
            bold = r is best
            ax.plot(positions, loss, color=family_color(family, shades[r.N]), marker="." if bold else None,
                    lw=2.0 if bold else 0.8, alpha=1.0 if bold else 0.5,
                    label=f"{label(family)} N={r.N:,}" if bold else None)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(compact))
    ax.grid(True, which="both", alpha=0.25)
    ax.set_xlabel("position in the context window (tokens)")
    ax.set_ylabel("validation loss (nats/token), mean per position bin")
    ax.set_title("Per-position loss (cf. LMU paper Fig. 4); bold: each family's largest model", fontsize=10)
    _legend(ax)
    return save(fig, out_dir, "per_position")


def fit_span(x, points: int = 100) -> np.ndarray:
    """Where a fitted curve may be drawn: its data's range widened by EXTRAPOLATION at each end."""
    return np.geomspace(min(x) / EXTRAPOLATION, max(x) * EXTRAPOLATION, points)


def isoflop(entries: list, out_dir) -> list[Path]:
    """``entries``: dicts {family, fit (IsoflopFit)}. Left: profiles; right: N_opt(C)."""
    from lmu_jax.scaling.isoflop import CHINCHILLA_A

    fig, (ax, opt) = plt.subplots(1, 2, figsize=(12, 5))
    drawn_optima = []
    for entry in entries:
        family, fit = entry["family"], entry["fit"]
        shades = size_shades(b.C for b in fit.budgets)
        for b in fit.budgets:
            color = family_color(family, shades[b.C])
            ax.plot(b.N[b.fitted], b.loss[b.fitted], "o", color=color, ms=5,
                    label=f"{label(family)}, C = {b.C:.2g}" + ("" if b.bracketed else " (not bracketed)"))
            ax.plot(b.N[~b.fitted], b.loss[~b.fitted], "o", mfc="none", color=color, ms=5)  # outside the window
            fitted = b.N[b.fitted]
            span = np.geomspace(fitted.min(), fitted.max(), 100)  # the parabola is local: drawn over its window only
            ax.plot(span, b.profile(span), "-" if b.bracketed else ":", color=color, lw=1.2)
            if b.bracketed:
                ax.plot([b.N_opt], [b.L_opt], "*", color=color, ms=13, mec="k", mew=0.6)
        used = fit.used
        if not used:
            continue
        C = np.array([b.C for b in used])
        n_opt = np.array([b.N_opt for b in used])
        color = family_color(family, 1.0)
        errors = np.array([[n - b.ci.get("N_opt", (n, n))[0], b.ci.get("N_opt", (n, n))[1] - n]
                           for n, b in zip(n_opt, used)]).T.clip(min=0)
        opt.errorbar(C, n_opt, yerr=errors, fmt="*", color=color, ms=10, capsize=3,
                     label=f"{label(family)}: N_opt per budget")
        drawn_optima.append((C, n_opt))
        span = fit_span(C)
        if fit.identified:
            lo, hi = fit.ci.get("a", (fit.a, fit.a))
            pivot = float(np.exp(np.log(C).mean()))
            centre = fit.N_opt(pivot)
            opt.plot(span, fit.N_opt(span), "-", color=color, lw=1.6,
                     label=f"{label(family)}: N_opt = {fit.G:.3g}·C^{fit.a:.3f}")
            opt.fill_between(span, centre * (span / pivot) ** lo, centre * (span / pivot) ** hi, color=color,
                             alpha=0.15, lw=0, label=f"a in [{lo:.3f}, {hi:.3f}]")
        else:
            opt.plot([], [], " ", label=f"{label(family)}: not identified, no line drawn")
    if drawn_optima:
        C = np.concatenate([c for c, _ in drawn_optima])
        n_opt = np.concatenate([n for _, n in drawn_optima])
        pivot, centre = np.exp(np.log(C).mean()), np.exp(np.log(n_opt).mean())
        span = fit_span(C)
        opt.plot(span, centre * (span / pivot) ** CHINCHILLA_A, "--", color="0.4", lw=1.2,
                 label=f"slope a = {CHINCHILLA_A:.2f} (Chinchilla), for reference")
        log_axes(opt, y_counts=True)
    else:
        opt.text(0.5, 0.5, "No budget brackets its optimum:\nno N_opt to show (see the flags in the report)",
                 ha="center", va="center", transform=opt.transAxes, fontsize=10)
        opt.set_xticks([])
        opt.set_yticks([])
    log_axes(ax)
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("IsoFLOP profiles: parabolas in log N (dotted: minimum not bracketed)\n"
                 "stars: the minima that the ladder brackets", fontsize=9)
    _legend(ax)
    opt.set_xlabel("training FLOPs C (our convention)")
    opt.set_ylabel("compute-optimal N")
    opt.set_title("N_opt(C) from the bracketed budgets, with the fitted line and its band", fontsize=9)
    if drawn_optima:
        _legend(opt)
    return save(fig, out_dir, "isoflop")


def _law_text(fit, x: str) -> str:
    if fit.E:
        return f"{fit.E:.3g} + {fit.A:.3g}·{x}^-{fit.alpha:.3f}"
    return f"{fit.A:.3g}·{x}^-{fit.alpha:.3f}"


def _legend(ax) -> None:
    """Inside the axes when short; below them when long (so it never hides the data)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= 5:
        ax.legend(fontsize=7)
    else:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)


def compact(value: float, _pos=None) -> str:
    """20k, 1.5M, 3G: short tick labels for counts (parameters, tokens, FLOPs)."""
    for factor, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def _count_ticks(axis, low: float, high: float) -> None:
    """Compact count labels at 1-2-3-5 per decade, or at decades only where the axis spans more than 2."""
    wide = high / low > 300
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0,) if wide else (1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(compact))
    axis.set_minor_formatter(ticker.NullFormatter())


def log_axes(ax, *, x_counts: bool = True, y_counts: bool = False) -> None:
    """Log-log axes whose labels do not collide: compact count ticks on x (and on y with ``y_counts``),
    loss-sized ticks on y otherwise."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    if x_counts:
        _count_ticks(ax.xaxis, *ax.get_xlim())
    if y_counts:
        _count_ticks(ax.yaxis, *ax.get_ylim())
        ax.grid(True, which="both", alpha=0.25)
        return
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.25)
