"""The report of a run: one self-contained HTML page (``report.html``) made from a run's output directory.

Modelled on Cell Ranger's web summary and MultiQC's report: an alert
banner for what needs attention, the headline numbers, then one section
each for the input and QC, every test, the optional steps, the plan and
the time and memory profile, the settings and versions, and the output
files. Figures are :mod:`pertscale.pl`'s, drawn from the files on disk
(one row of a result per volcano plot, reductions for screen-wide plots)
and embedded as PNG; the page loads nothing from the network and opens
offline. :func:`pertscale.report` rebuilds it from an output directory alone;
``pertscale run`` writes it unless ``--no-report`` is given.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: The files a directory must hold to be a pertscale output.
REQUIRED = ("run.json", "qc.csv")
#: Perturbations whose volcano plots a method's section shows.
N_VOLCANO = 4
#: Rows of a table shown in the page (the whole table is the linked file).
N_ROWS = 25
#: Fewer control cells than this is an alert.
FEW_CONTROL = 100
#: Image resolution (dots per inch) of the embedded figures.
DPI = 96

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f4f6f9}
header{background:#243b55;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.85;font-size:13px}
nav{background:#fff;border-bottom:1px solid #dde2ea;padding:8px 32px;position:sticky;top:0;z-index:2}
nav a{margin-right:16px;color:#243b55;text-decoration:none;font-size:14px}
main{padding:16px 32px;max-width:1280px}
section{background:#fff;border:1px solid #dde2ea;border-radius:6px;padding:8px 20px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eef1f5;padding-bottom:6px}h3{font-size:15px;margin-bottom:4px}
.alert{border-radius:5px;padding:8px 14px;margin:6px 0;font-size:14px}
.alert.warn{background:#fff4e5;border:1px solid #f0b45a}.alert.ok{background:#eaf7ee;border:1px solid #7cc48f}
.alert.info{background:#eaf2fb;border:1px solid #8cb4e2}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#f7f9fc;border:1px solid #dde2ea;border-radius:6px;padding:10px 16px;min-width:150px}
.card .v{font-size:24px;font-weight:600;color:#243b55}.card .k{font-size:12px;color:#5b6577}
img{max-width:100%;height:auto}figure{margin:8px 0}figcaption{font-size:12px;color:#5b6577}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #dde2ea;padding:3px 8px;text-align:left}th{background:#f7f9fc}
td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f9fc;border:1px solid #dde2ea;padding:8px;font-size:12px;overflow-x:auto}
.error{color:#a33;font-size:13px}
"""


def check_output_dir(out_dir: Path) -> None:
    """Raise unless ``out_dir`` holds a run's outputs (:data:`REQUIRED`).

    Raises
    ------
    FileNotFoundError
        If it does not exist.
    ValueError
        If it lacks ``run.json`` or ``qc.csv``.
    """
    if not out_dir.is_dir():
        raise FileNotFoundError(f"{str(out_dir)!r} does not exist or is not a directory: give a pertscale run's --out")
    missing = [name for name in REQUIRED if not (out_dir / name).is_file()]
    if missing:
        raise ValueError(
            f"{str(out_dir)!r} is not the output of a pertscale run: it has no {' or '.join(missing)} "
            "(`pertscale run ... --out DIR` writes them; runs of pertscale before 0.2 wrote no run.json: "
            "run it again with --overwrite)"
        )


def build_report(directory: Path, *, out: Path) -> None:
    """Write the report of the run files in ``directory`` (an output or a run's staging directory) to ``out``."""
    from ._progress import steps

    t0 = time.perf_counter()
    page = _Page(directory)
    with steps(3 + 4 * len(page.methods) + 2 * ("pca" in page.files), "report", unit="figure") as bar:
        page.bar = bar  # one bar over the figures; the reads for each figure show none of their own
        text = page.render()
    tmp = Path(out)
    tmp.write_text(text, encoding="utf-8")
    logger.info("report written in %.1f s: %s", time.perf_counter() - t0, out)


class _Page:
    """The sections of one report, drawn from the files of ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.run = json.loads((directory / "run.json").read_text())
        self.qc = pd.read_csv(directory / "qc.csv", index_col=0, keep_default_na=False)
        self.qc.index = self.qc.index.astype(str)
        self.files = self.run.get("files", {})
        self.methods = [k.partition(":")[2] for k in self.files if k.startswith("results:")]
        self.alerts: list[tuple[str, str]] = []
        self.knockdown: dict[str, pd.DataFrame] = {}
        self.bar = None

    # ------------------------------------------------------------------ pieces

    def figure(self, draw, caption: str = "") -> str:
        """``draw()`` (a function returning an Axes or Figure) as an embedded PNG; an error note if it fails."""
        import matplotlib.pyplot as plt

        try:  # no rc_context: in a kernel, leaving one after its first figure turns interactive plotting off
            artist = draw()
            fig = artist if hasattr(artist, "savefig") else np.ravel(artist)[0].figure
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
            plt.close(fig)
        except Exception as err:  # noqa: BLE001 - one figure that cannot be drawn must not lose the report
            logger.warning("report: a figure could not be drawn: %s", err)
            plt.close("all")
            return f'<p class="error">This figure could not be drawn: {html.escape(str(err))}</p>'
        if self.bar is not None:
            self.bar.update(1)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">{cap}</figure>'

    def path(self, key: str) -> Path | None:
        name = self.files.get(key)
        if name is None or not (self.dir / name).exists():
            return None
        return self.dir / name

    # ------------------------------------------------------------------ sections

    def render(self) -> str:
        sections = [self.section_qc()]
        sections += [self.section_method(m) for m in self.methods]
        sections += [self.section_screen()]
        sections += [self.section_steps(), self.section_profile(), self.section_settings(), self.section_files()]
        head = self.section_summary()  # after the others: their alerts are known
        run = self.run
        title = f"pertscale report: {Path(run['input']['path']).name}"
        nav = [("summary", "Summary"), ("qc", "Input and QC")]
        nav += [(f"method-{m}", m) for m in self.methods]
        nav += [("screen", "Screen: effects, calibration")]
        nav += [("steps", "HVG, PCA, pseudo-bulk"), ("profile", "Plan and profile"), ("settings", "Settings"),
                ("files", "Files")]  # fmt: skip
        links = "".join(f'<a href="#{k}">{html.escape(v)}</a>' for k, v in nav)
        version = html.escape(run["versions"].get("pertscale", ""))
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(run['input']['path'])} &middot; "
            f"{html.escape(run.get('created', ''))} &middot; pertscale {version}"
            f"</p></header><nav>{links}</nav><main>{head}{''.join(sections)}</main></body></html>\n"
        )

    def section_summary(self) -> str:
        s = self.run["summary"]
        inp = self.run["input"]
        fdr = s["fdr"]
        cards = [
            (f"{s['n_obs_kept']:,}", f"cells kept of {inp['n_obs']:,}"),
            (f"{s['n_vars_kept']:,}", f"genes kept of {inp['n_vars']:,}"),
            (f"{s['n_perturbations_tested']:,}", "perturbations tested"),
            (f"{s['n_control_cells']:,}", f"control cells ({html.escape(self.run['control_label'])})"),
        ]
        for method, counts in s["de_genes"].items():
            values = np.array(list(counts.values()), dtype=np.int64)
            cards.append((f"{int(values.sum()):,}", f"{method}: DE pairs at FDR {fdr}"))
            hit = int((values > 0).sum())
            cards.append((f"{hit:,}", f"{method}: perturbations with DE genes"))
        n_control = s["n_control_cells"]
        if n_control < FEW_CONTROL:
            self.alerts.insert(0, ("warn", f"Only {n_control} control cells were kept: every test compares with "
                                           "them, and with so few the tests have little power."))  # fmt: skip
        dropped = pd.Series(s.get("perturbations_dropped", {}), dtype=object)
        excluded = dropped[dropped == "excluded"]
        filtered = dropped[dropped != "excluded"]
        if len(filtered):
            reasons = filtered.value_counts()
            why = ", ".join(f"{n} by {r}" for r, n in reasons.items())
            shown = ", ".join(filtered.index[:12]) + (" ..." if len(filtered) > 12 else "")
            self.alerts.append(("warn", f"{len(filtered)} perturbation(s) dropped by the QC filters ({why}): {shown}. "
                                        "See qc.csv."))  # fmt: skip
        if len(excluded):
            self.alerts.append(("info", f"Labels left out of the tests by --exclude-labels (default: multiple, "
                                        f"unassigned): {', '.join(excluded.index[:12])}."))  # fmt: skip
        lost = 1 - s["n_obs_kept"] / max(inp["n_obs"], 1)
        if lost > 0.2:
            self.alerts.append(("warn", f"{lost:.0%} of the cells were dropped by the QC filters and labels."))
        if not any(kind == "warn" for kind, _ in self.alerts):
            self.alerts.insert(0, ("ok", "Nothing needs attention: enough control cells, no perturbation dropped by "
                                         "the filters."))  # fmt: skip
        banner = "".join(f'<div class="alert {k}">{html.escape(t)}</div>' for k, t in self.alerts)
        card_html = "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>'
                            for v, k in cards)  # fmt: skip
        total = self.run.get("seconds") or sum(st["seconds"] for st in self.run["profile"]["stages"]
                                                if st["name"] != "report")  # fmt: skip
        return (
            f'<section id="summary"><h2>Summary</h2>{banner}<div class="cards">{card_html}</div>'
            f"<p>Tests: {', '.join(self.methods)}; {total:,.1f} s from the start of the run to its report."
            "</p></section>"
        )

    def section_qc(self) -> str:
        from . import pl

        parts = ['<section id="qc"><h2>Input and QC</h2>']
        q = self.run["qc"]
        parts.append(
            f"<p>Filters: cells with at least {q['min_genes']} genes; genes detected in at least "
            f"{q['min_cells_per_gene']} kept cells; perturbations with at least {q['min_cells_per_perturbation']} "
            f"kept cells; labels excluded: {html.escape(', '.join(q['exclude_labels']) or 'none')}.</p>"
        )
        parts.append(self.figure(lambda: pl.qc_metrics(self.dir), "QC metrics per cell (kept and dropped)"))
        parts.append(self.figure(lambda: pl.qc_perturbation_counts(self.dir), "Cells per perturbation, before and "
                                 "after QC"))  # fmt: skip
        parts.append("<h3>qc.csv</h3>" + _table(self.qc.head(N_ROWS), index=True))
        if len(self.qc) > N_ROWS:
            parts.append(f"<p>{len(self.qc) - N_ROWS:,} more rows in {_link('qc.csv')}.</p>")
        parts.append("</section>")
        return "".join(parts)

    def section_method(self, method: str) -> str:
        from . import pl

        store = self.path(f"results:{method}")
        parts = [f'<section id="method-{html.escape(method)}"><h2>{html.escape(method)}</h2>']
        if store is None:
            return parts[0] + "<p>No results file.</p></section>"
        fdr = self.run["summary"]["fdr"]
        counts = pd.Series(self.run["summary"]["de_genes"].get(method, {}), dtype=np.int64)
        parts.append(f"<p>Results: {_link(store.name)}; significant pairs (pvals_adj &lt; {fdr}): "
                     f"{_link(self.files.get(f'significant:{method}', ''))}.</p>")  # fmt: skip
        known = counts if len(counts) else None  # run.json's, at the same threshold: not counted again
        parts.append(self.figure(lambda: pl.de_genes_per_perturbation(store, pval_threshold=fdr, counts=known),
                                 f"DE genes per perturbation (pvals_adj < {fdr})"))  # fmt: skip
        top = [str(p) for p in counts.sort_values(ascending=False, kind="stable").index[:N_VOLCANO]]
        if top:
            parts.append(self.figure(lambda: self._volcanoes(store, top), "Volcano plots of the perturbations with "
                                     "the most DE genes"))  # fmt: skip
        if len(counts) >= 2:
            parts.append(self.figure(lambda: pl.de_heatmap(store, pval_threshold=fdr, counts=known),
                                     "log2 fold changes of the top perturbations' top genes (clustered)"))  # fmt: skip
        parts.append(self._knockdown(method, store))
        parts.append("</section>")
        return "".join(parts)

    def _volcanoes(self, store: Path, perturbations: list[str]):
        import matplotlib.pyplot as plt

        from . import pl

        fig, axs = plt.subplots(1, len(perturbations), figsize=(3.6 * len(perturbations), 3.4), squeeze=False)
        for ax, p in zip(axs[0], perturbations, strict=True):
            pl.volcano(store, p, ax=ax, n_labels=6)
        fig.tight_layout()
        return fig

    def _knockdown(self, method: str, store: Path) -> str:
        from . import pl

        try:
            table = pl.knockdown_table(store, targets=self.run.get("targets") or None)
        except Exception as err:  # noqa: BLE001 - shown in the page
            return f'<p class="error">Knock-down of targets: {html.escape(str(err))}</p>'
        if table.empty:
            return "<h3>Knock-down of targets</h3><p>No perturbation's target is among the measured genes.</p>"
        self.knockdown[method] = table
        fdr = self.run["summary"]["fdr"]
        down = (table["logfoldchanges"] < 0) & (table["pvals_adj"] < fdr)
        text = (f"<h3>Knock-down of targets</h3><p>{int(down.sum())} of {len(table)} perturbations whose target "
                f"is measured lower it significantly (log2 fold change &lt; 0, pvals_adj &lt; {fdr}).</p>")  # fmt: skip
        if (~down).any():
            names = ", ".join(map(str, table.loc[~down, "perturbation"].head(12)))
            self.alerts.append(("info", f"{method}: {int((~down).sum())} perturbation(s) do not lower their own "
                                        f"target significantly: {names}"))  # fmt: skip
        figure = self.figure(lambda: pl.knockdown(store, targets=self.run.get("targets") or None),
                             "log2 fold change of each perturbation's own target")  # fmt: skip
        return text + figure + _table(table.head(N_ROWS), index=False)

    def section_screen(self) -> str:
        """Per-perturbation effects (DE genes, knock-down, impact), escapers, energy distance and calibration."""
        from . import pl

        parts = ['<section id="screen"><h2>Screen: which perturbations did something, and can the p-values be '
                 "trusted</h2>"]  # fmt: skip
        fdr = self.run["summary"]["fdr"]
        for method in self.methods:
            effects = self.path(f"effects:{method}")
            if effects is None:
                continue
            table = pd.read_csv(effects)
            order = table.sort_values("impact_z", ascending=False, kind="stable")
            parts.append(f"<h3>{html.escape(method)}: effect of each perturbation</h3><p>One row per perturbation "
                         f"({_link(effects.name)}): DE genes at FDR {fdr}, the knock-down of its own target, and "
                         "the transcriptome-wide impact (<code>impact_z</code>: mean of z&sup2; &minus; 1 over the "
                         "genes, 0 without effects; <code>impact</code>: mean of log2FC&sup2; &minus; SE&sup2;, "
                         f"nb-glm). Every (perturbation, gene) pair: {_link(self.files.get(f'long:{method}', ''))}. "
                         "Sorted by impact:</p>")  # fmt: skip
            shown = [c for c in ("perturbation", "n_cells", "n_de_genes", "impact_z", "impact", "target",
                                 "knockdown_log2fc", "knockdown_detected", "edistance", "edistance_pvalue_adj")
                     if c in order and order[c].notna().any()]  # fmt: skip
            parts.append(_table(order[shown].head(N_ROWS), index=False))
            knock = self.path(f"knockdown:{method}")
            if knock is not None:
                kd = pd.read_csv(knock)
                measured = kd[kd["measured"].astype(bool)] if "measured" in kd else kd
                if len(measured) and "fraction_escapers" in measured:
                    shown = measured[["perturbation", "target", "logfoldchanges", "pvals_adj", "rank",
                                      "fraction_below_control_median", "fraction_escapers", "knockdown_detected"]]
                    parts.append(f"<p>Knock-down of each measured target and the fraction of escapers (cells whose "
                                 "target is at or above the control's median; ps.tl.knockdown): "
                                 f"{_link(knock.name)}, per cell {_link('knockdown_cells.parquet')}.</p>")  # fmt: skip
                    parts.append(_table(shown.head(N_ROWS), index=False))
        energy = self.path("energy_distance")
        if energy is not None:
            table = pd.read_csv(energy, index_col=0)
            n_sig = int((table["pvalue_adj"] < fdr).sum())
            parts.append(f"<h3>Energy distance to control</h3><p>{n_sig} of {len(table)} perturbations differ from "
                         f"the control in the PCA embedding (permutation test, BH-adjusted p &lt; {fdr}; "
                         f"{_link(energy.name)}).</p>")  # fmt: skip
            parts.append(self.figure(lambda: pl.energy_distance_ranking(table, fdr=fdr),
                                     "Perturbations ranked by energy distance to control"))  # fmt: skip
            parts.append(_table(table.sort_values("edistance", ascending=False).head(N_ROWS), index=True))
        calibration = self.path("calibration")
        if calibration is not None:
            table = pd.read_csv(calibration)
            pooled = table[table["split"] == "pooled"]
            parts.append("<h3>Calibration on control cells</h3><p>Pseudo-perturbations made of control cells only, "
                         "tested with the same code as the perturbations: a calibrated test gives about 5 % of "
                         "p-values below 0.05, a KS test against uniform that does not reject, and about no "
                         f"discoveries ({_link(calibration.name)}).</p>")  # fmt: skip
            keep = ["method", "n_splits", "n_cells", "n_tested", "frac_p05", "frac_p01", "ks_statistic", "ks_pvalue",
                    "n_discoveries"]  # fmt: skip
            parts.append(_table(pooled[[c for c in keep if c in pooled]], index=False))
            for _, row in pooled.iterrows():
                # under the null BH still finds something in about fdr of the splits, and with millions of discrete
                # p-values KS rejects deviations too small to matter: alert when KS rejects and the fractions are off
                off = abs(row.get("frac_p05", 0.05) - 0.05) > 0.01 or row.get("frac_p01", 0.01) > 0.02
                if row.get("ks_pvalue", 1) < 0.01 and off:
                    self.alerts.append(("warn", f"{row['method']}: p-values of control-only splits are not uniform "
                                                f"(KS p = {row['ks_pvalue']:.2g}, {row['frac_p05']:.3f} below 0.05): "
                                                "see the calibration section."))  # fmt: skip
            qq = self.path("calibration_pvalues")
            if qq is not None:
                parts.append(self.figure(lambda: pl.calibration_qq(pd.read_parquet(qq)),
                                         "QQ plot of the control splits' p-values against uniform"))  # fmt: skip
        if len(parts) == 1:
            parts.append("<p>No effect table in this output (runs before pertscale 0.2).</p>")
        parts.append("</section>")
        return "".join(parts)

    def section_steps(self) -> str:
        from . import pl

        parts = ['<section id="steps"><h2>HVG, PCA, pseudo-bulk</h2>']
        genes = self.path("hvg")
        pca = self.path("pca")
        bulk = self.path("pseudobulk")
        if genes is None and pca is None and bulk is None:
            parts.append("<p>None of the optional steps ran (<code>--hvg N</code>, <code>--pca N</code>, "
                         "<code>--pseudobulk</code>).</p>")  # fmt: skip
        if genes is not None:
            table = pd.read_csv(genes)
            if "highly_variable" in table:
                hv = table[table["highly_variable"].astype(bool)]
                order = ("highly_variable_rank", "dispersions_norm", "variances_norm")
                sort = next((c for c in order if c in hv), None)
                if sort is not None:
                    hv = hv.sort_values(sort, ascending=sort == "highly_variable_rank")
                parts.append(f"<h3>Highly variable genes</h3><p>{len(hv):,} of {len(table):,} genes "
                             f"({_link(genes.name)}); the first:</p>")  # fmt: skip
                parts.append(_table(hv.head(N_ROWS), index=False))
        if pca is not None:
            column = self.run["perturbation_column"]
            parts.append("<h3>Principal components</h3>")
            parts.append(self.figure(lambda: pl.pca_variance_ratio(pca), "Variance ratio per component"))
            parts.append(self.figure(lambda: pl.pca(pca, color=column), f"Cells on PC1 and PC2, by {column}"))
        if bulk is not None:
            parts.append(f"<h3>Pseudo-bulk</h3><p>Summed counts per perturbation and their log2 fold change "
                         f"against control: {_link(bulk.name)}.</p>")  # fmt: skip
        parts.append("</section>")
        return "".join(parts)

    def section_profile(self) -> str:
        from . import pl

        profile = self.run["profile"]
        parts = ['<section id="profile"><h2>Plan and profile</h2><h3>Plan</h3>']
        parts.append("<pre>" + html.escape("\n".join(self.run["plan"]["lines"])) + "</pre>")
        parts.append("<h3>Time and memory</h3>")
        parts.append(self.figure(lambda: pl.profile(self.run), "Seconds per stage; peak memory per process"))
        stages = pd.DataFrame(profile["stages"]).rename(columns={"name": "stage", "start": "start (s)"})
        rows = []
        for proc in profile["processes"]:
            peaks = proc["peak_rss"]
            rows.append({"process": proc["name"], "peak (GiB)": f"{max(peaks.values(), default=0) / 2**30:.2f}",
                         **{k: f"{v / 2**30:.2f}" for k, v in peaks.items()}})  # fmt: skip
        parts.append(_table(stages, index=False))
        if rows:
            parts.append("<p>Peak resident memory (GiB) per process and stage:</p>")
            parts.append(_table(pd.DataFrame(rows).fillna(""), index=False))
        parts.append("</section>")
        return "".join(parts)

    def section_settings(self) -> str:
        run = self.run
        settings = {"perturbation_column": run["perturbation_column"], "control_label": run["control_label"],
                    "input matrix": run["input"]["matrix"], **run["settings"]}  # fmt: skip
        rows = pd.DataFrame({"setting": list(settings), "value": [json.dumps(v) if not isinstance(v, str) else v
                                                                  for v in settings.values()]})  # fmt: skip
        versions = pd.DataFrame({"package": list(run["versions"]), "version": list(run["versions"].values())})
        command = run.get("command")
        cmd = f"<p>Command:</p><pre>{html.escape(' '.join(command))}</pre>" if command else ""
        return (f'<section id="settings"><h2>Settings and versions</h2>{cmd}'
                f"{_table(rows, index=False)}{_table(versions, index=False)}</section>")  # fmt: skip

    def section_files(self) -> str:
        rows = []
        for key, name in self.files.items():
            target = self.dir / name
            if not target.exists() and key != "report":
                continue
            size = _size(target) if target.exists() else None
            rows.append(f"<tr><td>{_link(name)}</td><td>{html.escape(key)}</td>"
                        f"<td class='n'>{'' if size is None else _human(size)}</td></tr>")  # fmt: skip
        store = self.run.get("working_store")
        if store:
            rows.append(f"<tr><td>{html.escape(store)}</td><td>working store (the cells sorted by perturbation; "
                        "reused while the input is unchanged)</td><td></td></tr>")
        return ('<section id="files"><h2>Files</h2><table><tr><th>file</th><th>what</th><th>size</th></tr>'
                + "".join(rows) + "</table></section>")  # fmt: skip


def _table(frame: pd.DataFrame, *, index: bool) -> str:
    """``frame`` as an HTML table (numbers right-aligned, floats with 4 significant digits)."""
    frame = frame.reset_index() if index else frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append(f"<td class='n'>{v:.4g}</td>")
            elif isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_):
                cells.append(f"<td class='n'>{v:,}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _link(name: str) -> str:
    return f'<a href="{html.escape(str(name))}">{html.escape(str(name))}</a>' if name else ""


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)
