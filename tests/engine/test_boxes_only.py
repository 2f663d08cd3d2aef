"""A dataset with boxes and no segmentations trains the detector's boxes and is scored as bbox."""

import json

from tests.engine.runs import (
    evaluate_command,
    read_records,
    run,
    tiny_recipe,
    tiny_shapes,
    train_command,
)


def strip_segmentations(data_root):
    for split in ("train", "val"):
        path = data_root / "annotations" / f"{split}.json"
        data = json.loads(path.read_text())
        for ann in data["annotations"]:
            del ann["segmentation"]
        path.write_text(json.dumps(data))


def test_boxes_only_data_trains_and_scores_bbox(tmp_path):
    data = tiny_shapes(tmp_path / "data")
    strip_segmentations(data)
    work_dir = tmp_path / "work"
    run(train_command(*tiny_recipe(data, work_dir), "max_iters=3", "workflow=[[train,1],[val,1]]"))
    records = read_records(work_dir)
    train = [r for r in records if r["phase"] == "train"]
    (val,) = [r for r in records if r["phase"] == "val"]
    assert all(r["loss_mask"] == 0.0 and r["loss_bbox"] > 0 for r in train)
    assert "bbox/AP" in val and not any(key.startswith("segm/") for key in val)
    # the best weights are chosen by box AP when there is no mask AP
    assert (work_dir / "checkpoints/best/model.safetensors").is_file()
    best = json.loads((work_dir / "checkpoints/best/info.json").read_text())
    assert best["bbox/AP"] == val["bbox/AP"]

    run(evaluate_command("--checkpoint", str(work_dir), *tiny_recipe(data, work_dir)))
    metrics = json.loads((work_dir / "eval/metrics.json").read_text())
    assert "bbox/AP" in metrics and not any(key.startswith("segm/") for key in metrics)
