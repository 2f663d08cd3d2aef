"""plot_metrics on a metrics.jsonl in the format the runner writes."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from trainer.tools import plot_metrics

LOSSES = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")


def _train(epoch: int, it: int, base: float, lr: float) -> dict:
    losses = {name: base / (k + 1) for k, name in enumerate(LOSSES)}
    return {
        "phase": "train",
        "epoch": epoch,
        "iter": it,
        **losses,
        "loss": sum(losses.values()),
        "lr": lr,
        "time_per_iter": 0.5,
    }


def _val(epoch: int, it: int, ap: float) -> dict:
    metrics = {f"{t}/{n}": ap for t in ("bbox", "segm") for n in ("AP", "AP75", "APs")}
    metrics.update({"bbox/AP50": 2 * ap, "segm/AP50": 2 * ap, "bbox/APl": -1.0})
    return {"phase": "val", "epoch": epoch, "iter": it, **metrics, "segm/APm": None}


@pytest.fixture()
def work_dir(tmp_path):
    records = [
        _train(1, 10, 2.0, 0.01),
        _train(1, 20, 1.5, 0.02),
        _val(1, 20, 0.1),
        _train(2, 30, 9.9, 0.9),  # interrupted, then resumed from epoch 1: logged again below
        _train(2, 30, 1.2, 0.02),
        _train(2, 40, 1.0, 0.002),
        _val(2, 40, 0.25),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _line(axes, label: str):
    (line,) = [line for line in axes.lines if line.get_label() == label]
    return list(line.get_xdata()), list(line.get_ydata())


def test_curves_hold_the_logged_values(work_dir):
    records = plot_metrics.read_metrics(work_dir)
    assert [(r["phase"], r["iter"]) for r in records] == [
        ("train", 10),
        ("train", 20),
        ("val", 20),
        ("train", 30),
        ("train", 40),
        ("val", 40),
    ]
    fig = plot_metrics.plot_metrics(records, work_dir / "out.png")
    losses, lr, ap = fig.axes
    assert _line(losses, "loss") == (
        [10, 20, 30, 40],
        [
            sum(2.0 / k for k in range(1, 6)),
            sum(1.5 / k for k in range(1, 6)),
            sum(1.2 / k for k in range(1, 6)),
            sum(1.0 / k for k in range(1, 6)),
        ],
    )
    assert _line(losses, "loss_cls") == ([10, 20, 30, 40], [2.0 / 3, 1.5 / 3, 1.2 / 3, 1.0 / 3])
    assert len(losses.lines) == 6
    assert list(lr.lines[0].get_ydata()) == [0.01, 0.02, 0.02, 0.002]
    assert lr.get_yscale() == "log"
    assert _line(ap, "segm/AP") == ([20, 40], [0.1, 0.25])
    assert _line(ap, "bbox/AP50") == ([20, 40], [0.2, 0.5])
    assert {line.get_label() for line in ap.lines} == set(plot_metrics.AP_CURVES)
    with Image.open(work_dir / "out.png") as image:
        assert image.format == "PNG" and image.size == (1600, 450)


def test_cli_writes_next_to_the_metrics(work_dir, capsys):
    assert plot_metrics.main([str(work_dir)]) == work_dir / "metrics.png"
    assert (work_dir / "metrics.png").is_file()
    assert plot_metrics.main([str(work_dir / "metrics.jsonl"), "--out", str(work_dir / "a/b.png")])
    assert (work_dir / "a/b.png").is_file()
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {work_dir / 'a/b.png'}"


def test_training_without_val_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_train(1, 5, 1.0, 0.01)) + "\n")
    fig = plot_metrics.plot_metrics(plot_metrics.read_metrics(tmp_path), tmp_path / "m.png")
    assert len(fig.axes[2].lines) == 0
    assert fig.axes[2].texts[0].get_text() == "no val records yet"


def test_bad_input_is_reported(tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="work_dir or a metrics.jsonl"):
        plot_metrics.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"phase": "train", "iter": 1}\nnot json\n')
    monkeypatch.setattr("sys.argv", ["plot_metrics", str(tmp_path)])
    with pytest.raises(SystemExit):
        plot_metrics.cli()
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'metrics.jsonl'}:2: not a")
