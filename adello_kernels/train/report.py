"""report.md and its PNG plots (matplotlib, Agg backend), written from the run's records:

    reliability.png     reliability diagram of the final EMA model (15 bins) with ECE / MCE
    per_class_acc.png   per-class test accuracy against the labeled class frequency
    prior.png           the prior estimate Q over training against the true unlabeled prior
    curves.png          loss terms, mask ratio and pseudo-label accuracy over training
    accuracy.png        top-1 / balanced accuracy / ECE at every evaluation
"""
from __future__ import annotations

import math
import os

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def plot_reliability(path: str, rel: dict, ece: float, mce: float) -> None:
    plt = _plt()
    edges = np.asarray(rel["edges"])
    count = np.asarray(rel["count"])
    acc = np.asarray(rel["accuracy"])
    conf = np.asarray(rel["confidence"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    has = count > 0
    ax.bar(centers[has], acc[has], width=width, edgecolor="black", color="tab:blue",
           label="accuracy")
    ax.bar(centers[has], (conf - acc)[has], bottom=acc[has], width=width, edgecolor="tab:red",
           color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"Reliability (EMA model, raw softmax)\nECE {100 * ece:.2f}%, "
                 f"MCE {100 * mce:.2f}%")
    ax.legend(loc="upper left", fontsize=8)
    ax2.bar(centers, count / max(1, count.sum()), width=width, color="gray", edgecolor="black")
    ax2.set_xlabel("top-label confidence")
    ax2.set_ylabel("fraction")
    ax2.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_class(path: str, per_class_acc, lb_counts, names) -> None:
    plt = _plt()
    acc = np.asarray([np.nan if a is None else a for a in per_class_acc], dtype=float)
    counts = np.asarray(lb_counts, dtype=float)
    order = np.argsort(-counts, kind="stable")
    c = len(acc)
    fig, ax = plt.subplots(figsize=(max(6, min(16, 0.12 * c + 4)), 4))
    x = np.arange(c)
    ax.bar(x, acc[order], color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (EMA)")
    ax.set_xlabel("classes, most to least labeled")
    if c <= 20:
        ax.set_xticks(x)
        ax.set_xticklabels([str(names[i])[:12] for i in order], rotation=45, ha="right",
                           fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(x, counts[order], "o-", color="tab:orange", ms=3)
    ax2.set_yscale("log")
    ax2.set_ylabel("labeled images", color="tab:orange")
    ax.set_title("Per-class accuracy vs labeled class frequency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prior(path: str, log: list[dict], true_prior, names) -> None:
    plt = _plt()
    recs = [r for r in log if r.get("prior_ulb") is not None]
    steps = np.asarray([r["step"] for r in recs])
    q = np.asarray([r["prior_ulb"] for r in recs])
    c = q.shape[1]
    # prior_estimator "em": the released (raw) estimator, tracked beside Q, dotted
    raw = None
    if all(r.get("prior_ulb_raw") is not None for r in recs):
        raw = np.asarray([[np.nan if v is None else v for v in r["prior_ulb_raw"]] for r in recs])
    fig, axes = plt.subplots(1, 2 if true_prior is not None else 1, figsize=(11, 4),
                             squeeze=False)
    ax = axes[0, 0]
    order = np.argsort(-np.asarray(true_prior)) if true_prior is not None else np.arange(c)
    shown = order if c <= 10 else order[np.linspace(0, c - 1, 10).round().astype(int)]
    colors = plt.get_cmap("tab10")
    for j, cls in enumerate(shown):
        ax.plot(steps, q[:, cls], color=colors(j % 10), label=str(names[cls])[:14])
        if raw is not None:
            ax.plot(steps, raw[:, cls], color=colors(j % 10), ls=":", lw=1.2)
        if true_prior is not None:
            ax.axhline(true_prior[cls], color=colors(j % 10), ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("class probability")
    what = "EM estimate Q (solid), raw estimate (dotted)" if raw is not None else \
        "Prior estimate Q (solid)"
    ax.set_title(f"{what} vs true unlabeled prior (dashed)"
                 if true_prior is not None else f"{what}; true prior unknown", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    if true_prior is not None:
        p = np.asarray(true_prior)
        m = p > 0
        def kl(est):
            return (p[m] * np.log(p[m] / np.clip(est[:, m], 1e-12, None))).sum(1)
        ax = axes[0, 1]
        ax.plot(steps, kl(q), color="black", label="Q (EM)" if raw is not None else "Q")
        if raw is not None:
            ax.plot(steps, kl(raw), color="black", ls=":", label="raw")
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("KL(true || Q)")
        ax.set_title("Distance of the estimate to the true prior")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(path: str, log: list[dict]) -> None:
    plt = _plt()
    steps = np.asarray([r["step"] for r in log])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "total"), ("loss_sup", "L_s (supervised)"),
                       ("loss_unsup", "L_u (consistency)"), ("loss_distill", "L_d (distill)")):
        vals = [r.get(key) for r in log]
        if any(v is not None for v in vals):
            ax.plot(steps, [np.nan if v is None else v for v in vals], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Training losses")
    for key, label in (("mask_ratio", "mask ratio (conf >= tau)"),
                       ("pl_acc_masked", "pseudo-label acc. (masked)"),
                       ("pl_acc", "pseudo-label acc. (all)")):
        vals = [r.get(key) for r in log]
        if any(v is not None for v in vals):
            ax2.plot(steps, [np.nan if v is None else v for v in vals], label=label)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    if ax2.get_lines():
        ax2.legend(fontsize=8)
    else:
        ax2.text(0.5, 0.5, "no unlabeled data (supervised)", ha="center", transform=ax2.transAxes)
    ax2.set_title("Unlabeled batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(path: str, evals: list[dict]) -> None:
    plt = _plt()
    steps = [r["step"] for r in evals]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("top1", "top-1"), ("balanced_acc", "balanced acc."), ("ece", "ECE")):
        ax.plot(steps, [r[key] for r in evals], "o-", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("EMA model on the test set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str, summary: dict, evals: list[dict], log: list[dict],
                 cfg: dict) -> list[str]:
    """Plots and report.md into run_dir; returns the PNG file names written."""
    names = summary.get("class_names") or [str(i) for i in range(len(summary["per_class_acc"]))]
    pngs = []

    def save(name, fn, *args):
        fn(os.path.join(run_dir, name), *args)
        pngs.append(name)

    save("reliability.png", plot_reliability, summary["reliability"], summary["ece"],
         summary["mce"])
    save("per_class_acc.png", plot_per_class, summary["per_class_acc"], summary["lb_counts"],
         names)
    if any(r.get("prior_ulb") is not None for r in log):
        save("prior.png", plot_prior, log, summary.get("prior_ulb_true"), names)
    if log:
        save("curves.png", plot_curves, log)
    if evals:
        save("accuracy.png", plot_accuracy, evals)

    title = {"adello": "ADELLO", "fixmatch": "FixMatch", "flexda": "FixMatch + FlexDA",
             "ccr": "FixMatch + CCR", "supervised": "Supervised only"}[cfg["algorithm"]]
    kl = summary.get("prior_kl")
    lines = [
        f"# {title} on {cfg['preset']}",
        "",
        f"{summary['steps']} steps in {summary['seconds']:.0f} s on {summary['device']} "
        f"(world size {summary['world_size']}, loss backend `{summary['backend']}`)"
        + (" - stopped early by the time limit" if summary.get("stopped_early") else "") + ".",
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 accuracy | {_pct(summary['top1'])} % |",
        f"| balanced accuracy | {_pct(summary['balanced_acc'])} % |",
        f"| ECE (15 bins) | {_pct(summary['ece'])} % |",
        f"| MCE (15 bins) | {_pct(summary['mce'])} % |",
        f"| KL(true prior, estimate) | {'n/a' if kl is None else f'{kl:.4f}'} |",
    ]
    kl_raw = summary.get("prior_kl_raw")
    if kl_raw is not None:  # prior_estimator "em": the raw estimator tracked beside it
        lines.append(f"| KL(true prior, raw estimate) | {kl_raw:.4f} |")
    lines += [
        "",
        "Evaluated on the EMA model's raw softmax. Split: "
        f"{int(sum(summary['lb_counts']))} labeled images "
        f"({', '.join(str(int(c)) for c in summary['lb_counts'][:12])}"
        f"{', ...' if len(summary['lb_counts']) > 12 else ''}), "
        f"{summary['ulb_pool_size']} images in the unlabeled pool.",
        "",
    ]
    for png in pngs:
        lines += [f"![{png[:-4]}]({png})", ""]
    lines += ["## Per-class accuracy", "", "| class | labeled | unlabeled pool | test acc. % |",
              "|---|---|---|---|"]
    ulb = summary.get("ulb_counts")
    for c, name in enumerate(names):
        lines.append(f"| {name} | {int(summary['lb_counts'][c])} | "
                     f"{'?' if ulb is None else int(ulb[c])} | "
                     f"{_pct(summary['per_class_acc'][c])} |")
    lines += ["", "## Configuration", "", "```yaml"]
    lines += [f"{k}: {v}" for k, v in cfg.items()]
    lines += ["```", ""]
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    return pngs
