"""Every report medunic writes, as Markdown tables and PNG plots: an evaluated model (JSON,
tables, t-SNE), comparisons of runs, a federated run's rounds, and the federated pipeline.

The ``results`` dict of one evaluated model (every section optional; produced by
``medunic_core.evaluation.run``)::

    {
      "meta": {"run": str, "checkpoint": str, "split": str, ...},   # free-form scalars
      "zeroshot": {lang: zeroshot.zeroshot_metrics(...)},             # e.g. "en", "es"
      "retrieval": retrieval.cross_lingual_retrieval(...),
          # {"en->es": {"R@1", "chance@1", "R@5", "chance@5", "n_queries", "n_excluded"},
          #  "es->en": {...}, "mean": {"R@1", "chance@1", ...}}
      "bias": {"text": bias.community_bias(...), "image": ...},     # any embedding kinds
          # each {"lang_mean_dist_over_spread", "silhouette_lang", "lang_id_probe_acc",
          #       "lang_id_chance", "n_per_lang"}
      "linear_probe": linear_probe.linear_probe(...),
          # {fraction: {"mean", "std", "per_seed", "per_finding", "n_train", "notes"}}
      "tsne": {"text": "tsne_text.png", ...},                        # plots, relative to out_dir
    }

Fraction keys may be floats or, after a JSON round trip, strings; both are read. Several
seeds of one variant are compared as a list of such dicts: cells become mean ± std
(population std over seeds).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence, Union

import numpy as np

from medunic_core.evaluation.zeroshot import l2_normalize
from medunic_core.privacy import NOT_COVERED

EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"
TSNE_MAX_POINTS = 3000  # t-SNE is quadratic; larger sets are subsampled (seeded)
MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")

Results = dict[str, Any]


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars to numbers, NaN to null, sets to sorted lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}" if math.isfinite(value) else "n/a"
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    return str(value)


def _fraction_label(fraction: Union[float, str]) -> str:
    return f"{float(fraction) * 100:g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def summary_metrics(results: Results) -> dict[str, Optional[float]]:
    """The headline numbers of one result as a flat ``{"section/.../metric": value}`` dict.

    Ordered as DESIGN.md ranks them: retrieval (primary), community bias, zero-shot,
    linear probe. Used for comparison tables and for logging.
    """
    out: dict[str, Optional[float]] = {}
    retrieval = results.get("retrieval", {})
    for direction, metrics in retrieval.items():
        for key, value in metrics.items():
            if key.startswith("R@") or (direction == "mean" and key.startswith("chance@")):
                out[f"retrieval/{direction}/{key}"] = value
    for kind, metrics in results.get("bias", {}).items():
        for key in ("lang_mean_dist_over_spread", "silhouette_lang", "lang_id_probe_acc"):
            out[f"bias/{kind}/{key}"] = metrics.get(key)
    for lang, metrics in results.get("zeroshot", {}).items():
        for key in ("macro_auc", "macro_f1", "accuracy"):
            out[f"zeroshot/{lang}/{key}"] = metrics.get(key)
        for finding, auc in (metrics.get("auc") or {}).items():
            out[f"zeroshot/{lang}/auc/{finding}"] = auc
    for lang, metrics in results.get("report_zeroshot", {}).items():
        out[f"report_zeroshot/{lang}/macro_auc"] = metrics.get("macro_auc")
    for fraction, metrics in results.get("linear_probe", {}).items():
        out[f"linear_probe/{_fraction_label(fraction)}/macro_auc"] = metrics.get("mean")
    for key in ("text_probe", "image_embedding_probe"):
        if key in results:
            out[f"{key}/macro_auc"] = results[key].get("mean")
    for key, value in results.get("heldout_loss", {}).items():
        out[f"heldout_loss/{key}"] = value
    if "seconds" in results:  # the training's wall time, where an experiment recorded it
        out["seconds"] = results["seconds"]
    return out


def format_eval_markdown(results: Results) -> str:
    """Markdown tables of one result: zero-shot, retrieval, bias, linear probe, plots."""
    meta = results.get("meta", {})
    lines = [f"# Evaluation: {meta.get('run', 'model')}", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in meta.items()] + [""]

    zeroshot = results.get("zeroshot", {})
    if zeroshot:
        findings = list(dict.fromkeys(f for m in zeroshot.values() for f in m.get("auc", {})))
        norm = results.get("norm", {})
        lines += ["## Zero-shot classification", "",
                  "Prediction = P(present) > 0.5; macro means over findings with both classes."
                  + (" Report normalisation: " + ", ".join(f"{k} {v}" for k, v in norm.items())
                     + " (a language without community statistics is normalised globally)." if norm else ""), ""]
        rows = [[lang, m.get("macro_auc"), m.get("macro_f1"), m.get("accuracy")]
                + [m.get("auc", {}).get(f) for f in findings] for lang, m in zeroshot.items()]
        lines += _table(["lang", "macro AUC", "macro F1", "accuracy"]
                        + [f"AUC {f}" for f in findings], rows) + [""]
        by_reports = results.get("report_zeroshot", {})
        if by_reports:
            lines += ["The same, each language's training reports in place of its prompts (the class "
                      "embedding of the reports stating a finding against those that do not). Above the "
                      "prompts, the prompts lose what the reports hold; near them, the alignment of images "
                      "and reports limits zero-shot.", ""]
            rows = [[lang, m.get("macro_auc")] + [m.get("auc", {}).get(f) for f in findings]
                    for lang, m in by_reports.items()]
            lines += _table(["lang (reports)", "macro AUC"] + [f"AUC {f}" for f in findings], rows) + [""]
        unseen = {lang: by for lang, by in results.get("unseen_prompt_words", {}).items() if by}
        if unseen:
            lines += ["Prompt words that no training report of the prompt's language uses: training never "
                      "placed them in context, so these prompts partly score initialisation. Adapt their "
                      "wording (configs/prompts.yaml) to how the community writes its reports.", ""]
            rows = [[lang, key, phrase, ", ".join(words)] for lang, by in unseen.items()
                    for key, phrases in by.items() for phrase, words in phrases.items()]
            lines += _table(["lang", "finding.side", "prompt", "unseen words"], rows) + [""]

    retrieval = results.get("retrieval", {})
    if retrieval:
        ks = [key[2:] for key in retrieval.get("mean", {}) if key.startswith("R@")]
        header = ["direction"] + [h for k in ks for h in (f"R@{k}", f"chance@{k}")]
        rows = [[d] + [m.get(f"{p}@{k}") for k in ks for p in ("R", "chance")]
                + [m.get("n_queries", ""), m.get("n_excluded", "")] for d, m in retrieval.items()]
        lines += ["## Cross-lingual retrieval", "",
                  "Hit = a top-k report of the other language has the same finding set; "
                  "chance = expected R@k of a random ranking.", ""]
        lines += _table(header + ["queries", "excluded"], rows) + [""]

    bias = results.get("bias", {})
    if bias:
        lines += ["## Community bias", "",
                  "Mean distance between language means / RMS within-language spread; "
                  "silhouette by language (cosine); language-ID probe accuracy (5-fold).", ""]
        rows = [[kind, m.get("lang_mean_dist_over_spread"), m.get("silhouette_lang"),
                 m.get("lang_id_probe_acc"), m.get("lang_id_chance")] for kind, m in bias.items()]
        lines += _table(["embedding", "mean dist / spread", "silhouette (lang)",
                         "lang-ID acc", "lang-ID chance"], rows) + [""]

    heldout = results.get("heldout_loss", {})
    if heldout:
        lines += ["## Training losses on the held-out pairs", "",
                  "Evaluation mode, views from a fixed seed: comparable across runs.", ""]
        lines += _table(list(heldout), [list(heldout.values())]) + [""]

    probe = results.get("linear_probe", {})
    if probe:
        lines += ["## Linear probe (frozen image features)", "", "Macro test AUC over seeds.", ""]
        rows = [[_fraction_label(f), m.get("mean"), m.get("std"),
                 ", ".join(_fmt(v) for v in m.get("per_seed", []))] for f, m in probe.items()]
        lines += _table(["labels", "macro AUC mean", "std", "per seed"], rows)
        notes = [n for m in probe.values() for n in m.get("notes", [])]
        lines += [""] + [f"- {n}" for n in dict.fromkeys(notes)] + ([""] if notes else [])

    embedding_probes = {name: results[key] for key, name in (("image_embedding_probe", "images (P_V)"),
                                                             ("text_probe", "reports (P_l)")) if key in results}
    if embedding_probes:
        lines += ["## Linear probe on the embeddings (all training labels)", "",
                  "How much of each finding the joint space holds, where zero-shot and retrieval score. "
                  "Below the image-feature probe, the projection loses a finding the image encoder "
                  "has; low on the reports, the text tower limits zero-shot and retrieval.", ""]
        per = next(iter(embedding_probes.values())).get("per_finding", {})
        rows = [[name, probe.get("mean"), *(probe.get("per_finding", {}).get(f) for f in per)]
                for name, probe in embedding_probes.items()]
        lines += _table(["embeddings", "macro AUC", *per], rows) + [""]

    for kind, path in results.get("tsne", {}).items():
        lines += [f"## t-SNE ({kind})", "", f"![t-SNE of {kind} embeddings]({path})", ""]
    return "\n".join(lines)


def write_eval_report(results: Results, out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``eval.json`` (all numbers) and ``eval.md`` (tables) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / EVAL_JSON, out_dir / EVAL_MD
    json_path.write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")
    md_path.write_text(format_eval_markdown(results) + "\n")
    return json_path, md_path


def _marker_group(label: Union[str, Collection[str], None]) -> str:
    if label is None or isinstance(label, str):
        return str(label)
    return "abnormal" if len(label) else "normal"


def plot_tsne(
    embeddings: Any,
    langs: Sequence[str],
    out_path: Union[str, Path],
    labels: Optional[Sequence[Union[str, Collection[str], None]]] = None,
    seed: int = 0,
    title: str = "t-SNE of embeddings by language",
) -> Path:
    """2-D t-SNE (cosine) of N x d embeddings as a PNG, coloured by language.

    ``labels`` sets the marker: a finding set gives normal (empty) vs abnormal, a string
    is used as is (e.g. the first finding). Perplexity is min(30, (N - 1) / 3), at least
    1, so small sets work; more than ``TSNE_MAX_POINTS`` points are subsampled.
    """
    from sklearn.manifold import TSNE

    plt = _pyplot()

    emb, lang_arr = l2_normalize(embeddings), np.asarray(langs)
    groups = np.asarray([_marker_group(x) for x in labels] if labels is not None
                        else ["all"] * emb.shape[0])
    if emb.shape[0] < 3 or lang_arr.shape[0] != emb.shape[0] or groups.shape[0] != emb.shape[0]:
        raise ValueError(
            f"t-SNE needs >= 3 points with one language (and label) each; got {emb.shape[0]} "
            f"points, {lang_arr.shape[0]} languages, {groups.shape[0]} labels"
        )
    if emb.shape[0] > TSNE_MAX_POINTS:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(emb.shape[0], TSNE_MAX_POINTS, replace=False))
        emb, lang_arr, groups = emb[keep], lang_arr[keep], groups[keep]
    perplexity = max(1.0, min(30.0, (emb.shape[0] - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca",
              random_state=seed).fit_transform(emb)

    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, lang in enumerate(sorted(set(lang_arr.tolist()))):
        for j, group in enumerate(sorted(set(groups.tolist()))):
            sel = (lang_arr == lang) & (groups == group)
            if sel.any():
                name = lang if labels is None else f"{lang} / {group}"
                ax.scatter(xy[sel, 0], xy[sel, 1], s=12, alpha=0.7, color=colours(i % 10),
                           marker=MARKERS[j % len(MARKERS)], label=name)
    ax.set_title(f"{title} (n={emb.shape[0]}, perplexity={perplexity:.0f})")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def _aggregate(runs: Mapping[str, Union[Results, Sequence[Results]]]) -> tuple[list[str], dict]:
    keys: dict[str, None] = {}
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name, run in runs.items():
        replicas = [run] if isinstance(run, Mapping) else list(run)
        summaries = [summary_metrics(r) for r in replicas]
        table[name] = {}
        for summary in summaries:
            keys.update(dict.fromkeys(summary))
        for key in keys:
            values = [s[key] for s in summaries if s.get(key) is not None]
            table[name][key] = {
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values)) if values else None,
                "values": values,
            }
    # a metric first seen in a later run is missing from the earlier ones
    for name in table:
        for key in keys:
            table[name].setdefault(key, {"mean": None, "std": None, "values": []})
    return list(keys), table


def _cell(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "n/a"
    if len(entry["values"]) > 1:
        return f"{entry['mean']:.3f} ± {entry['std']:.3f} (n={len(entry['values'])})"
    return f"{entry['mean']:.3f}"


def compare_table(
    runs: Mapping[str, Union[Results, Sequence[Results]]],
    by_run: bool = False,
    columns: Optional[Sequence[str]] = None,
) -> str:
    """Markdown table with one column per run and one row per headline metric (or, with
    ``by_run``, one row per run: better for many variants). ``columns`` picks metrics.

    A run may be one results dict or a list of them (seeds), shown as mean ± std.
    """
    keys, table = _aggregate(runs)
    keys = [k for k in keys if columns is None or k in columns]
    names = list(table)
    if by_run:
        lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        return "\n".join(lines + ["| " + n + " | " + " | ".join(_cell(table[n][k]) for k in keys) + " |"
                                  for n in names])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += ["| " + key + " | " + " | ".join(_cell(table[n][key]) for n in names) + " |"
              for key in keys]
    return "\n".join(lines)


def finding_table(table: Mapping[str, Mapping[str, dict[str, Any]]]) -> str:
    """Zero-shot AUC of each finding, one row per run and prompt language: the mean over
    seeds and its range, which shows the findings whose ranking turns over (below 0.5) in
    some seeds and not in others: what makes a macro AUC swing between seeds. "" without
    per-finding AUCs."""
    pattern = re.compile(r"zeroshot/(\w+)/auc/(\w+)$")
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    findings: dict[str, None] = {}
    for name, metrics in table.items():
        for key, entry in metrics.items():
            match = pattern.match(key)
            if match and entry["values"]:
                cells.setdefault((name, match[1]), {})[match[2]] = entry
                findings[match[2]] = None
    if not cells:
        return ""

    def cell(entry: Optional[dict[str, Any]]) -> str:
        if entry is None:
            return "n/a"
        values = entry["values"]
        spread = f" ({min(values):.2f}-{max(values):.2f}, {sum(v < 0.5 for v in values)} below 0.5)" if len(values) > 1 else ""
        return f"{entry['mean']:.2f}{spread}"

    lines = ["## Zero-shot AUC by finding", "",
             "Mean over seeds (lowest-highest, seeds below 0.5, where the ranking turned over).", "",
             "| run | prompts | " + " | ".join(findings) + " |", "|---|---|" + "---|" * len(findings)]
    lines += [f"| {name} | {lang} | " + " | ".join(cell(by.get(f)) for f in findings) + " |"
              for (name, lang), by in cells.items()]
    return "\n".join(lines)


def write_comparison(
    runs: Mapping[str, Union[Results, Sequence[Results]]], out_dir: Union[str, Path], by_run: bool = False,
    preamble: str = "", columns: Optional[Sequence[str]] = None,
) -> tuple[Path, Path]:
    """Write ``compare.md`` (the table of :func:`compare_table`) and ``compare.json``.

    ``compare.json`` is ``{"metrics": [keys in order], "runs": {name: {key: {"mean",
    "std", "values"}}}}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, table = _aggregate(runs)
    md_path, json_path = out_dir / COMPARE_MD, out_dir / COMPARE_JSON
    by_finding = finding_table(table) if by_run else ""
    md_path.write_text(
        "# Comparison\n\nPrimary: cross-lingual retrieval R@k (DESIGN.md); zero-shot AUC and "
        "the language-ID probe saturate early, report but do not steer by them.\n\n"
        + (preamble + "\n\n" if preamble else "") + compare_table(runs, by_run, columns) + "\n"
        + (f"\n{by_finding}\n" if by_finding else "")
    )
    json_path.write_text(
        json.dumps(to_jsonable({"metrics": keys, "runs": table}), indent=2, allow_nan=False) + "\n"
    )
    return md_path, json_path


# -- federated runs and the pipeline: per-round tables and plots -------------------------
REPORT_DIR = "report"
BIAS_KEYS = ("lang_mean_dist_over_spread", "silhouette_lang", "lang_id_probe_acc")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(path: Path, title: str, series: dict[str, tuple[list[int], list[float]]], ylabel: str) -> None:
    plt = _pyplot()
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


def _bars(path: Path, labels: Sequence[str], panels: Mapping[str, Sequence[float]]) -> None:
    """One bar chart per panel, side by side, over the same labels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels.items()):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "rounds.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a federated run folder")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_federated_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report/report.md`` and its plots; returns the Markdown path."""
    run_dir = Path(run_dir)
    rows = read_rounds(run_dir)
    out = run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    loss_keys = sorted({k for r in rows for k in (r.get("train") or {}) if k.startswith("train_") and k.endswith("loss")})
    _lines(out / "losses.png", "mean training losses of the sites",
          {k.removeprefix("train_"): _series(rows, "train", k) for k in loss_keys}, "loss")
    langs = sorted({k.removeprefix("zeroshot_") for r in rows for k in (r.get("central") or {}) if k.startswith("zeroshot_")})
    zs = {f"central, {lang} prompts": _series(rows, "central", f"zeroshot_{lang}") for lang in langs}
    zs.update(_site_series(rows, "zeroshot_auc"))
    _lines(out / "zeroshot.png", "zero-shot macro AUC per community", zs, "macro AUC")
    bias_keys = [k for k in ("R@1", "R@5", "bias_lang_mean_dist_over_spread", "bias_silhouette_lang", "bias_lang_id_probe_acc")
                 if any(k in (r.get("central") or {}) for r in rows)]
    _lines(out / "bias.png", "community bias and EN<->ES retrieval (central held-out set)",
          {k: _series(rows, "central", k) for k in bias_keys}, "value")

    private = any(r.get("privacy") for r in rows)
    lines = [f"# Federated run: {run_dir.name}", ""]
    header = ["round", "sites", "rejected", "loss", *[f"zero-shot {lang}" for lang in langs], *bias_keys,
              *(["epsilon (max over sites)"] if private else []), "seconds"]
    table = []
    for r in rows:
        central, train = r.get("central") or {}, r.get("train") or {}
        table.append([r["round"], ", ".join(r.get("sites", [])), ", ".join(r.get("rejected", [])) or "-",
                      train.get("train_loss"), *[central.get(f"zeroshot_{lang}") for lang in langs],
                      *[central.get(k) for k in bias_keys],
                      *([max((p["epsilon"] for p in (r.get("privacy") or {}).values()), default=None)] if private else []),
                      f"{r.get('seconds', 0.0):.1f}"])
    lines += _table(header, table)
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
    lines = ["## Differential privacy (update-level, at each site)", ""]
    lines += _table(["site", "epsilon (this run)", "epsilon (all releases of its data)", "delta", "releases",
                     "noise multiplier", "clip"],
                    [[site, p["epsilon"], p["epsilon_all_runs"], f"{p['delta']:g}", int(p["releases"]),
                      p["noise_multiplier"], f"{p['clip']:g}"] for site, p in sorted(last.items())])
    lines += ["", "Each site clipped its update to the L2 norm `clip` and added Gaussian noise of std "
              "`noise multiplier x clip` before it left the site; epsilon is (epsilon, delta)-DP for each record and "
              "for the site's data as a whole, against everyone who saw its updates, the coordinator included "
              "(RDP accounting, sensitivity 2 x clip).",
              f"Not covered by epsilon: {'; '.join(NOT_COVERED)}. Token-usage rows were not sent.", ""]
    return lines


def write_pipeline_report(out: Path, results: dict[str, Any], variants: Sequence[str]) -> Path:
    """``report.md`` and ``bias.png``: the stages' summaries and community bias per stage."""
    vocab = results["vocab"]
    lines = [f"# Federated pipeline ({results['data']}, {results['pairs_per_site']} pairs per site)", "",
             "## Vocabulary stage", "",
             f"{vocab['vocab_size']} tokens (sha256 {vocab['sha256'][:12]}...), from the word counts of "
             f"{', '.join(f'{s} ({r})' for s, r in vocab['sites'].items())}; words received per language: "
             f"{vocab['words_received']}.", "", "## MLM stage", "", "| round | mean MLM loss of the sites |", "|---|---|"]
    lines = lines[:-2] + _table(["round", "mean MLM loss of the sites"],
                                [[i, r.get("train_mlm_loss")] for i, r in enumerate(results["mlm"], start=1)])
    rows = [("after MLM only", "F_l [CLS]", results["after_mlm"], {})]
    for v in variants:
        res = results[f"vlp-{v}"]
        rows.append((f"VLP federated-{v}, CTR on", "F_l [CLS]", res["bias"]["encoder"], res))
        rows.append((f"VLP federated-{v}, CTR on", f"P_l ({res['meta']['eval_norm']} norm)", res["bias"]["text"], res))
    header = ["stage", "embedding", "mean dist / spread", "silhouette (lang)", "lang-ID acc", "R@1", "R@5",
              "zero-shot en", "zero-shot es"]
    lines += ["", "## Community bias, measured (lower = less language clustering)", ""]
    lines += _table(header, [[name, emb, *(bias.get(k) for k in BIAS_KEYS),
                              ((res.get("retrieval") or {}).get("mean") or {}).get("R@1"),
                              ((res.get("retrieval") or {}).get("mean") or {}).get("R@5"),
                              ((res.get("zeroshot") or {}).get("en") or {}).get("macro_auc"),
                              ((res.get("zeroshot") or {}).get("es") or {}).get("macro_auc")]
                             for name, emb, bias, res in rows])
    chance = next(((results[f"vlp-{v}"].get("retrieval") or {}).get("mean", {}) for v in variants), {})
    lines += ["", f"F_l [CLS]: the text encoder's features; P_l: the report embedding. Chance levels: language-ID "
                  f"probe {_fmt(results['after_mlm'].get('lang_id_chance'))}, EN<->ES retrieval R@1 "
                  f"{_fmt(chance.get('chance@1'))}, R@5 {_fmt(chance.get('chance@5'))}.", "",
              "![community bias](bias.png)", ""]
    labels = [f"{n.replace('VLP federated-', 'VLP ').replace(', CTR on', '')}\n{e.split(' (')[0]}" for n, e, _, _ in rows]
    _bars(out / "bias.png", labels, {title: [b.get(key) or 0.0 for _, _, b, _ in rows] for key, title in
                                     zip(BIAS_KEYS[:2], ("distance between language means / spread",
                                                         "silhouette by language"))})
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
