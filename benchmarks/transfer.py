"""Fine-tuning from a trained detector (``load_from``) against training from scratch.

    python benchmarks/transfer.py [--source-epochs 4] [--epochs 4] [--out work_dirs/transfer]

1. Generates the demo's shapes set (circles, squares, triangles) and a copy of its training
   annotations without the triangles.
2. Trains recipes/demo.yaml on the circles and squares only: the source model.
3. Trains on all three classes twice with the same seed: from scratch, and with
   ``load_from`` the source (its circle and square rows are kept by name; triangle is new).
4. Prints segm AP on the val split after each epoch for both, and for each AP level the
   first epoch (and iteration) at which each run reached it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data.shapes import generate_shapes  # noqa: E402


def train(
    name: str, out: Path, data: Path, anns: tuple[Path, Path], epochs: int, *extra: str
) -> list:
    """Run recipes/demo.yaml with a val phase after every epoch; returns the val records."""
    work_dir = out / name
    command = [
        sys.executable,
        str(ROOT / "trainer/run.py"),
        str(ROOT / "recipes/demo.yaml"),
        f"work_dir={work_dir}",
        *(f"data.{split}.type=CocoDataset" for split in ("train", "val")),
        f"data.train.ann_file={anns[0]}",
        f"data.train.img_dir={data}/train",
        f"data.val.ann_file={anns[1]}",
        f"data.val.img_dir={data}/val",
        f"total_epochs={epochs}",
        "workflow=[[train,1],[val,1]]",
        f"lr_schedule.steps=[{max(epochs - 1, 1)}]",
        "log_images=0",
        *extra,
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    print(f"[{name}] {' '.join(command[2:])}", flush=True)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("phase") == "val"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-epochs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default="work_dirs/transfer")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "shapes"
    generate_shapes(data)
    source_anns = []
    for split in ("train", "val"):
        full = json.loads((data / f"annotations/{split}.json").read_text())
        keep = {c["id"] for c in full["categories"] if c["name"] != "triangle"}
        two_classes = {
            **full,
            "categories": [c for c in full["categories"] if c["id"] in keep],
            "annotations": [a for a in full["annotations"] if a["category_id"] in keep],
        }
        source_anns.append(out / f"{split}_circles_squares.json")
        source_anns[-1].write_text(json.dumps(two_classes))

    train("source", out, data, tuple(source_anns), args.source_epochs)
    full_anns = (data / "annotations/train.json", data / "annotations/val.json")
    runs = {
        "scratch": train("scratch", out, data, full_anns, args.epochs),
        "load_from": train(
            "load_from", out, data, full_anns, args.epochs, f"load_from={out / 'source'}"
        ),
    }
    print("\nsegm AP on the val split (all three classes) after each epoch:")
    print("| epoch | iter | from scratch | load_from (circles, squares) |")
    print("|---:|---:|---:|---:|")
    for a, b in zip(runs["scratch"], runs["load_from"]):
        print(f"| {a['epoch']} | {a['iter']} | {a['segm/AP']:.3f} | {b['segm/AP']:.3f} |")
    for level in (0.05, 0.1, 0.15, 0.2, 0.3):
        reached = {
            name: next((r["iter"] for r in records if r["segm/AP"] >= level), None)
            for name, records in runs.items()
        }
        print(
            f"segm AP >= {level}: scratch at iter {reached['scratch']}, "
            f"load_from at iter {reached['load_from']}"
        )


if __name__ == "__main__":
    main()
