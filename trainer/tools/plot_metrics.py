"""Plot the loss, learning-rate and AP curves of a run from its ``metrics.jsonl``.

    python -m trainer.tools.plot_metrics WORK_DIR_OR_METRICS_JSONL [--out PNG]

Three panels over training iterations: every ``loss*`` value of the train records (the total
``loss`` drawn thicker), ``lr`` on a log scale, and ``bbox/AP``, ``segm/AP`` (solid) and their
AP50 (dashed) of the val records. The PNG defaults to ``metrics.png`` next to the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from trainer.cli import run_main

AP_CURVES = ("bbox/AP", "segm/AP", "bbox/AP50", "segm/AP50")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.tools.plot_metrics",
        description="Loss, lr and AP curves of a run as a PNG.",
    )
    parser.add_argument("path", help="a work_dir or its metrics.jsonl")
    parser.add_argument("--out", help="PNG to write (default: metrics.png next to the file)")
    return parser.parse_args(argv)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl (or of a work_dir's), sorted by iteration.

    A resumed run that logs an iteration again replaces the earlier record of that phase and
    iteration, so each curve is a function of the iteration.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: pass a work_dir or a metrics.jsonl.")
    records: dict[tuple[str, int], dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[(record["phase"], int(record["iter"]))] = record
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a metrics record: {line[:80]!r}") from None
    if not records:
        raise ValueError(f"{path} holds no records yet.")
    return sorted(records.values(), key=lambda r: (r["iter"], r["phase"] != "train"))


def _series(records: list[dict], phase: str, key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["iter"], r[key]) for r in records if r["phase"] == phase and r.get(key) is not None
    ]
    return [i for i, _ in points], [v for _, v in points]


def plot_metrics(records: list[dict[str, Any]], out: str | Path):
    """Draw the three panels for ``records`` (as from :func:`read_metrics`), save them to the
    PNG ``out`` and return the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (losses, lr, ap) = plt.subplots(1, 3, figsize=(16, 4.5), sharex=True, layout="constrained")
    train_keys = {k for r in records if r["phase"] == "train" for k in r}
    for key in sorted(k for k in train_keys if k.startswith("loss")):
        losses.plot(*_series(records, "train", key), label=key, lw=2.5 if key == "loss" else 1)
    losses.set(title="training losses", xlabel="iteration")
    lr.plot(*_series(records, "train", "lr"), color="tab:purple")
    lr.set(title="learning rate", xlabel="iteration", yscale="log")
    for key in AP_CURVES:
        iters, values = _series(records, "val", key)
        if iters:
            style = "--" if key.endswith("AP50") else "-"
            color = "tab:blue" if key.startswith("bbox") else "tab:orange"
            ap.plot(iters, values, style, color=color, marker="o", label=key)
    ap.set(title="val AP", xlabel="iteration")
    ap.set_ylim(bottom=0)
    if not any(r["phase"] == "val" for r in records):
        ap.text(0.5, 0.5, "no val records yet", ha="center", va="center", transform=ap.transAxes)
    for axes in (losses, ap):
        if axes.lines:
            axes.legend(fontsize="small")
    for axes in (losses, lr, ap):
        axes.grid(alpha=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> Path:
    """Run the command; returns the PNG path."""
    args = parse_args(argv)
    records = read_metrics(args.path)
    source = Path(args.path)
    if args.out:
        out = Path(args.out)
    else:
        out = (source if source.is_dir() else source.parent) / "metrics.png"
    plot_metrics(records, out)
    print(f"wrote {out}")
    return out


def cli() -> None:
    run_main(main, (ValueError,))


if __name__ == "__main__":
    cli()
