"""Training report: the per-epoch history for metrics.json and a PNG of the curves and scores.

The PNG has three panels: training loss per epoch, validation NDCG@10 per epoch, and a
bar chart of test NDCG@10 and Recall@10 of the model beside the baselines and the
reference points below.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

REPORT_FILE = "report.png"

# Test figures of other implementations on the MovieLens-100K leave-one-out split of this
# project (full ranking, seen items excluded), measured on the 2-core development machine.
# RecBole 1.2.1 GRU4Rec: embedding 64, hidden 128, cross-entropy, dropout 0.3, mean of 3
# seeds. RecBole SASRec: hidden 64, 2 layers, 2 heads, dropout 0.2.
REFERENCE_POINTS: dict[str, dict[str, float]] = {
    "RecBole GRU4Rec": {"ndcg@10": 0.093, "recall@10": 0.185, "mrr@10": 0.066},
    "RecBole SASRec": {"ndcg@10": 0.094, "recall@10": 0.173},
}
REFERENCE_SPREAD = {"RecBole GRU4Rec": {"ndcg@10": 0.012, "recall@10": 0.014}}
# The figures apply only to this dataset.
REFERENCE_DATASET = "ml-100k"


def training_summary(result) -> dict[str, Any]:
    """Return the metrics.json "training" section of a TrainResult."""
    return {
        "best_epoch": result.best_epoch,
        "stopped_because": result.stopped_because,
        "seconds": round(result.seconds, 1),
        "history": [asdict(record) for record in result.history],
    }


def write_report(out_dir: Path, metrics: dict[str, Any], dataset: str = REFERENCE_DATASET) -> Path:
    """Draw the report PNG into ``out_dir`` and return its path.

    ``metrics`` has the metrics.json shape with a "training" section. Reference points
    are drawn only for ``dataset`` == "ml-100k", the split they were measured on.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display is needed to write a file
    from matplotlib import pyplot

    history = metrics["training"]["history"]
    epochs = [record["epoch"] for record in history]
    figure, (loss_axes, valid_axes, bars_axes) = pyplot.subplots(1, 3, figsize=(16, 4.5))

    loss_axes.plot(epochs, [record["train_loss"] for record in history], marker="o")
    loss_axes.set(title="training loss", xlabel="epoch", ylabel="mean loss per target")

    valid_axes.plot(epochs, [record["valid_ndcg_at_10"] for record in history], marker="o", color="tab:green")
    best_epoch = metrics["training"]["best_epoch"]
    valid_axes.axvline(best_epoch, color="grey", linestyle="--", label=f"best epoch {best_epoch}")
    valid_axes.set(title="validation NDCG@10", xlabel="epoch", ylabel="NDCG@10")
    valid_axes.legend()

    _draw_comparison(bars_axes, comparison_rows(metrics, dataset))
    figure.tight_layout()
    path = Path(out_dir) / REPORT_FILE
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


def comparison_rows(metrics: dict[str, Any], dataset: str = REFERENCE_DATASET) -> dict[str, dict[str, float]]:
    """Return {name: {"ndcg@10": …, "recall@10": …}} for the model, baselines and references."""
    rows = {"model": metrics["model"]["test"]}
    for name, figures in metrics.get("baselines", {}).items():
        rows[name] = figures["test"]
    if dataset == REFERENCE_DATASET:
        rows.update(REFERENCE_POINTS)
    return rows


def _draw_comparison(axes, rows: dict[str, dict[str, float]]) -> None:
    names = list(rows)
    positions = range(len(names))
    width = 0.4
    for offset, metric in ((-width / 2, "ndcg@10"), (width / 2, "recall@10")):
        heights = [rows[name].get(metric, 0.0) for name in names]
        axes.bar([position + offset for position in positions], heights, width, label=metric)
    axes.set_xticks(list(positions), names, rotation=25, ha="right")
    axes.set(title="test metrics (full ranking, seen excluded)")
    axes.legend()
