"""The report of a federated run folder: one Markdown page and PNG plots.

Reads what the coordinator wrote (``rounds.jsonl``, one line per round, and the final
``model/eval/eval.json``) and writes ``report/report.md`` with:

- ``losses.png``: the sites' mean training losses per round;
- ``zeroshot.png``: zero-shot macro AUC per language community per round (central
  held-out set, and each site's own held-out split);
- ``bias.png``: community-bias metrics and EN<->ES retrieval per round;
- the t-SNE of report embeddings by language of the final model;
- under update-level DP, the epsilon per round and each site's spent epsilon.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from medunic_core.evaluation.report import format_eval_markdown
from medunic_core.privacy import NOT_COVERED

REPORT_DIR = "report"


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a federated run folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(path: Path, title: str, series: dict[str, tuple[list[int], list[float]]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (x, y) in series.items():
        if x:
            ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(rows: list[dict], section: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[section][key]) for r in rows if isinstance(r.get(section), dict)
           and isinstance(r[section].get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _site_series(rows: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for site, m in (r.get("sites_eval") or {}).items():
            if isinstance(m.get(metric), (int, float)):
                xs, ys = out.setdefault(f"site {site} ({m.get('community', '?')})", ([], []))
                xs.append(r["round"])
                ys.append(float(m[metric]))
    return out


def write_federated_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/report.md`` and its plots; returns the Markdown path."""
    run_dir = Path(run_dir)
    rows = read_rounds(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    loss_keys = sorted({k for r in rows for k in (r.get("train") or {}) if k.startswith("train_") and k.endswith("loss")})
    _plot(out / "losses.png", "mean training losses of the sites",
          {k.removeprefix("train_"): _series(rows, "train", k) for k in loss_keys}, "loss")
    langs = sorted({k.removeprefix("zeroshot_") for r in rows for k in (r.get("central") or {}) if k.startswith("zeroshot_")})
    zs = {f"central, {lang} prompts": _series(rows, "central", f"zeroshot_{lang}") for lang in langs}
    zs.update(_site_series(rows, "zeroshot_auc"))
    _plot(out / "zeroshot.png", "zero-shot macro AUC per community", zs, "macro AUC")
    bias_keys = [k for k in ("R@1", "R@5", "bias_lang_mean_dist_over_spread", "bias_silhouette_lang", "bias_lang_id_probe_acc")
                 if any(k in (r.get("central") or {}) for r in rows)]
    _plot(out / "bias.png", "community bias and EN<->ES retrieval (central held-out set)",
          {k: _series(rows, "central", k) for k in bias_keys}, "value")

    private = any(r.get("privacy") for r in rows)
    lines = [f"# Federated run: {run_dir.name}", ""]
    header = ["round", "sites", "rejected", "loss", *[f"zero-shot {lang}" for lang in langs], *bias_keys,
              *(["epsilon (max over sites)"] if private else []), "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        central, train = r.get("central") or {}, r.get("train") or {}
        cells = [str(r["round"]), ", ".join(r.get("sites", [])), ", ".join(r.get("rejected", [])) or "-",
                 _fmt(train.get("train_loss")), *[_fmt(central.get(f"zeroshot_{lang}")) for lang in langs],
                 *[_fmt(central.get(k)) for k in bias_keys],
                 *([_fmt(max((p["epsilon"] for p in (r.get("privacy") or {}).values()), default=None))] if private else []),
                 _fmt(r.get("seconds"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![losses](losses.png)", "![zero-shot](zeroshot.png)", "![bias](bias.png)", ""]
    if private:
        lines += privacy_section(rows)
    final = run_dir / "model" / "eval" / "eval.json"
    if final.is_file():
        results = json.loads(final.read_text())
        lines += ["## Final model (exported to `model/`)", "", format_eval_markdown(results), ""]
        tsne = final.parent / "tsne_text.png"
        if tsne.is_file():
            shutil.copy(tsne, out / "tsne_text.png")
            lines += ["![t-SNE of report embeddings](tsne_text.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def privacy_section(rows: list[dict[str, Any]]) -> list[str]:
    """Each site's spent epsilon (its last release in this run) and what it covers."""
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        for site, p in (r.get("privacy") or {}).items():
            last[site] = {**p, "round": r["round"]}
    lines = ["## Differential privacy (update-level, at each site)", "",
             "| site | epsilon (this run) | epsilon (all releases of its data) | delta | releases | noise multiplier | clip |",
             "|---|---|---|---|---|---|---|"]
    for site, p in sorted(last.items()):
        lines.append(f"| {site} | {p['epsilon']:.3f} | {p['epsilon_all_runs']:.3f} | {p['delta']:g} | {int(p['releases'])} "
                     f"| {p['noise_multiplier']:.3f} | {p['clip']:g} |")
    lines += ["", "Each site clipped its update to the L2 norm `clip` and added Gaussian noise of std "
              "`noise multiplier x clip` before it left the site; epsilon is (epsilon, delta)-DP for each record and "
              "for the site's data as a whole, against everyone who saw its updates, the coordinator included "
              "(RDP accounting, sensitivity 2 x clip).",
              f"Not covered by epsilon: {'; '.join(NOT_COVERED)}. Token-usage rows were not sent.", ""]
    return lines


def _fmt(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"
