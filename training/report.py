"""The written outcome of an experiment: results.json, report.md beside published numbers, plots.

The published numbers are embedded here as data, each table with its source (collected in the
project's reference notes on peers). Nothing is parsed at run time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.experiment import ProtocolResult

logger = logging.getLogger(__name__)

PEER_MARKETS = ("de", "jp", "in", "fr", "ca", "mx", "uk")


@dataclass(frozen=True)
class Peer:
    """One published method's numbers on our markets, and which of our models it faces."""

    name: str
    ours: str  # our model to compare with
    metrics: dict[str, dict[str, float]]  # metric -> market -> value


@dataclass(frozen=True)
class PeerSet:
    source: str
    caveat: str
    peers: tuple[Peer, ...]


def _row(values: str) -> dict[str, float]:
    return dict(zip(PEER_MARKETS, (float(v) for v in values.split()), strict=True))


def _acmr_peer(name: str, ours: str, r5: str, r10: str, n5: str, n10: str) -> Peer:
    return Peer(name, ours, {"hr@5": _row(r5), "hr@10": _row(r10), "ndcg@5": _row(n5),
                             "ndcg@10": _row(n10)})


def _forec_peer(name: str, n10: str) -> Peer:
    return Peer(name, "bert4xmr", {"ndcg@10": _row(n10)})


ACMR_SOURCE = (
    "Bert4XMR authors' code, repository laowangzi/ACMR, files log/*.log (last two `test:` "
    "lines): one logged run per market, not the paper's mean of 5 runs."
)
FOREC_SOURCE = (
    "Repository samarthbhargav/efficient-xmrec, results.ipynb (re-runs by the Market-Aware "
    "authors), NDCG@10."
)
PEERS: dict[str, PeerSet] = {
    "acmr": PeerSet(ACMR_SOURCE, "One run per market; recall with one held-out item = HR.", (
        _acmr_peer("ACMR log, fine-tuned", "bert4xmr",
                   ".6834 .6386 .7824 .6948 .4942 .7822 .6459",
                   ".7931 .7351 .8452 .8118 .5949 .8482 .7461",
                   ".5628 .4960 .6721 .5583 .3987 .7118 .5368",
                   ".5979 .5274 .6928 .5963 .4312 .7334 .5691"),
        _acmr_peer("ACMR log, pre-trained", "global_only",
                   ".6656 .4887 .6695 .6589 .4940 .7194 .6095",
                   ".7742 .6201 .7824 .7851 .5930 .7923 .7178",
                   ".5492 .3730 .5580 .5228 .3958 .6496 .5028",
                   ".5844 .4158 .5942 .5633 .4279 .6731 .5378"),
    )),
    "forec": PeerSet(FOREC_SOURCE, (
        "Their ca, de, fr and uk files are a larger data release than ours; in, jp, mx are the "
        "same. Global models use all markets plus US data; pairwise ones the target plus its "
        "best single source market."), (
        _forec_peer("NMF++ (global)", ".3262 .1930 .4796 .3030 .2851 .5340 .4476"),
        _forec_peer("MA-NMF++ (global)", ".3442 .2212 .4602 .3052 .3112 .5536 .4604"),
        _forec_peer("MA-MLP++ (global)", ".3158 .2195 .4398 .2958 .3178 .5258 .4535"),
        _forec_peer("MAML (global)", ".3281 .1860 .4736 .3022 .2836 .5317 .4474"),
        _forec_peer("FOREC (global)", ".3249 .1956 .4778 .3033 .2947 .5409 .4474"),
        _forec_peer("NMF (target only)", ".3214 .1717 .4265 .3014 .2848 .5430 .4488"),
        _forec_peer("NMF++ (pairwise)", ".3332 .1921 .4595 .3271 .3008 .5590 .4702"),
        _forec_peer("MA-NMF++ (pairwise)", ".3415 .1896 .4433 .3228 .3158 .5573 .4578"),
        _forec_peer("FOREC (pairwise)", ".3040 .1983 .4458 .3191 .2927 .5442 .4683"),
    )),
}
NO_PEERS = (
    "No published method was measured with the `full` protocol (full ranking, time split) on "
    "these files, so this report compares the served ranking and Bert4XMR with our own `pop`, "
    "`itemknn`, `itemknn_recency` and `ease` baselines (the README adds RecBole's SASRec and "
    "ItemKNN, run on one market each)."
)
SELECTION_TEXT = {
    "full": "Early stopping uses full-ranking validation NDCG@10.",
    "forec": "Early stopping uses full-ranking validation NDCG@10 on the time split that "
             "`forec` shares with `full` (so both protocols score the same models).",
    "acmr": "Early stopping uses validation NDCG@10 on the validation items' own sampled "
            "negatives.",
}
PROTOCOL_TEXT = {
    "full": "time-ordered leave-one-out; the held-out item ranked against every item sold in "
            "the market, minus the user's training items",
    "forec": "time-ordered leave-one-out; the held-out item ranked against 99 negatives sampled "
             "from the market's items the user never interacted with",
    "acmr": "random leave-one-out (shuffled with the seed); the held-out item ranked against 99 "
            "negatives sampled from all markets' items, minus the user's items. Every model "
            "ranks only the items with a training interaction in the market (what it is known "
            "to sell before any held-out item is seen; the service's index likewise holds only "
            "the market's items): other candidates score -inf, so a held-out item with no "
            "training interaction in the market is always missed",
}


def peer_comparisons(protocol: str, markets: list[str]) -> list[Peer]:
    """Published rows for the protocol that cover at least one of `markets`."""
    if protocol not in PEERS:
        return []
    return [p for p in PEERS[protocol].peers
            if any(m in by_market for by_market in p.metrics.values() for m in markets)]


def _cell(stat: dict[str, float], with_std: bool) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}" if with_std else f"{stat['mean']:.4f}"


def _relative(ours: float, theirs: float) -> str:
    return f"{100.0 * (ours - theirs) / theirs:+.1f}%" if theirs else "n/a"


def _metric_table(result: ProtocolResult, metric: str) -> list[str]:
    table = result.aggregate()
    means = result.market_mean()
    lines = ["| model | " + " | ".join(result.markets) + " | mean |",
             "|---" * (len(result.markets) + 2) + "|"]
    for model in result.models:
        spread = len(result.seeds) > 1
        cells = [_cell(table[m][model][metric], spread) for m in result.markets]
        mean = _cell(means[model][metric], spread)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {mean} |")
    for peer in peer_comparisons(result.protocol, result.markets):
        if metric in peer.metrics:
            values = [peer.metrics[metric].get(m) for m in result.markets]
            shown = [f"{v:.4f}" if v is not None else "–" for v in values]
            known = [v for v in values if v is not None]
            mean = f"{np.mean(known):.4f}" if len(known) == len(values) else "–"
            lines.append(f"| *{peer.name}* | " + " | ".join(shown) + f" | {mean} |")
    return lines


def _relative_table(result: ProtocolResult) -> list[str]:
    table = result.aggregate()
    means = result.market_mean()
    header = ["| ours vs reference | metric | " + " | ".join(result.markets) + " | mean |",
              "|---" * (len(result.markets) + 3) + "|"]
    lines: list[str] = []
    pairs: list[tuple[str, str, dict[str, dict[str, float]]]] = []
    ours_rows = [m for m in ("served", "bert4xmr") if m in result.models]
    for peer in peer_comparisons(result.protocol, result.markets):
        for ours in dict.fromkeys(["served", peer.ours]):
            if ours in result.models:
                pairs.append((ours, peer.name, peer.metrics))
    for ours in ours_rows:
        for baseline in ("pop", "itemknn", "itemknn_recency", "ease"):
            if baseline not in result.models:
                continue
            values = {k: {m: table[m][baseline][k]["mean"] for m in result.markets}
                      for k in ("hr@10", "ndcg@10")}
            pairs.append((ours, baseline, values))
    for ours, name, metrics in pairs:
        for metric, by_market in metrics.items():
            cells, ours_known, theirs_known = [], [], []
            for m in result.markets:
                theirs = by_market.get(m)
                mine = table[m][ours][metric]["mean"]
                cells.append(_relative(mine, theirs) if theirs is not None else "–")
                if theirs is not None:
                    ours_known.append(mine)
                    theirs_known.append(theirs)
            full = len(theirs_known) == len(result.markets)
            mean = (_relative(means[ours][metric]["mean"], float(np.mean(theirs_known)))
                    if full else "–")
            lines.append(f"| {ours} vs {name} | {metric} | " + " | ".join(cells) + f" | {mean} |")
    return header + lines if lines else []


def _chance_note(result: ProtocolResult) -> str:
    d_model = result.config.get("d_model")
    if not isinstance(d_model, int) or d_model < 1:
        return ""
    return (f"Untrained (random) rows of width {d_model} would give |cosine| of about "
            f"1/sqrt({d_model}) = {1 / np.sqrt(d_model):.2f}; only values well beyond that are "
            "learned similarity.")


def render_report(result: ProtocolResult) -> str:
    """report.md: our metrics (mean ± std over seeds) beside the published ones."""
    seeds = ", ".join(str(s) for s in result.seeds)
    spread = "mean ± sample std over seeds" if len(result.seeds) > 1 else "one seed: no spread"
    shared = (f" The same trained models are also scored under {', '.join(result.shared_with)}."
              if result.shared_with else "")
    lines = [
        f"# Experiment report: protocol `{result.protocol}`", "",
        f"Protocol: {PROTOCOL_TEXT[result.protocol]}.", "",
        f"Seeds: {seeds} ({spread}). Markets: {', '.join(result.markets)}. "
        f"Test users per market: {result.n_users}. Device: {result.device}. "
        f"Training wall time: {result.train_seconds:.1f} s.{shared}", "",
        "Model selection, early stopping, the served ranker's scorer, ItemKNN's recency "
        "decay and EASE's L2 weight use the validation items only; the test items are scored "
        "once per model and seed, after training, and never influence a choice. "
        f"{SELECTION_TEXT[result.protocol]}", "",
        "Models: `served` what `POST /markets/{m}/recommend` returns, computed by the service's "
        "own function (`training.ranker.rank_session`): the fine-tuned Bert4XMR's inner-product "
        "top candidates and the items co-occurring most with the session, re-scored by one "
        "scorer fitted on all markets' validation items (sampled protocols: the candidates "
        "given, as a request's `candidates`); `bert4xmr` the model alone (the default "
        "configuration), pre-trained on all markets and fine-tuned on the market; "
        "`bert4xmr_paper` the paper's form (the session as a set, plain mean pooling, market "
        "embedding on both sides, masked-item objective only); `global_only` the pre-trained "
        "model without fine-tuning; `no_market_emb` the default pipeline without market "
        "embeddings; `target_only` Bert4XMR trained on the market alone; `pop` the market's "
        "most popular training items (fixed tie-break); `itemknn` cosine item-item "
        "co-occurrence over all markets' training sequences; `itemknn_recency` the same with "
        "the session's items weighted by decay^age (age 0 the newest; decay per market and "
        "seed chosen on validation); `ease` EASE (Steck, WWW 2019: item-item weights by a "
        "ridge regression with a zero diagonal) over all markets' training sequences, its L2 "
        "weight (300 or 800) chosen per seed on the mean validation NDCG@10. Ties count "
        "against the held-out item.", "",
    ]
    if result.protocol in PEERS:
        peer_set = PEERS[result.protocol]
        lines += [f"Published numbers (*italic* rows): {peer_set.source} {peer_set.caveat}", ""]
        if not peer_comparisons(result.protocol, result.markets):
            lines += [f"None of these markets ({', '.join(result.markets)}) has published "
                      f"numbers ({', '.join(PEER_MARKETS)}).", ""]
    else:
        lines += [NO_PEERS, ""]
    lines += ["## NDCG@10", "", *_metric_table(result, "ndcg@10"), ""]
    relative = _relative_table(result)
    if relative:
        lines += ["## Relative difference (ours − reference) / reference", "", *relative, ""]
    for metric in ("hr@5", "ndcg@5", "hr@10", "hr@20", "ndcg@20"):
        lines += [f"## {metric.upper()}", "", *_metric_table(result, metric), ""]
    lines += [
        "## Plots", "",
        "![NDCG@10 per market](ndcg10.png)", "",
        "![Market similarity](market_similarity.png)", "",
        "Market similarity: cosine similarity of the rows of the pre-trained global model's "
        f"market embedding, averaged over {len(result.seeds)} seed(s). {_chance_note(result)}",
        "",
    ]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_outputs(result: ProtocolResult, out_dir: Path) -> list[Path]:
    """Write results.json, report.md, ndcg10.png and market_similarity.png into `out_dir`.

    The figures need matplotlib, the `report` extra (`pip install 'xmr[report]'`), which the
    serving image leaves out; without it the numbers are written and the figures skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "report.md"]
    _write_text(paths[0], json.dumps(result.to_json(), indent=2) + "\n")
    _write_text(paths[1], render_report(result))
    try:
        from training.figures import plot_market_similarity, plot_ndcg
    except ImportError as e:
        logger.warning("figures skipped: %s (install the report extra: pip install "
                       "'xmr[report]')", e)
        for path in paths:
            logger.info("wrote path=%s", path)
        return paths
    shown = peer_comparisons(result.protocol, result.markets)
    peers = {p.name: p.metrics["ndcg@10"] for p in shown if "ndcg@10" in p.metrics}
    paths.append(plot_ndcg(result, peers, out_dir / "ndcg10.png"))
    paths.append(plot_market_similarity(result.markets, result.similarity(),
                                        out_dir / "market_similarity.png"))
    for path in paths:
        logger.info("wrote path=%s", path)
    return paths


def output_dirs(out: Path, protocols: list[str]) -> dict[str, Path]:
    """OUT itself for one protocol; OUT/<protocol> for each of several."""
    if len(protocols) == 1:
        return {protocols[0]: out}
    return {p: out / p for p in protocols}
