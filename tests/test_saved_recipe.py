"""Values taken from the environment are used by a run but never written: config.yaml, the
checkpoints' recipe and weights metadata, and the trackers' config keep ``${oc.env:...}``."""

import json
import subprocess
from pathlib import Path

from safetensors import safe_open

from tests.engine.runs import ENV, ROOT, tiny_recipe, tiny_shapes, train_command
from trainer.config import load_recipe, to_dict
from trainer.saved_recipe import saved_recipe_yaml

SECRET = "s3cr3t-t0ken-value"


def write_recipe(tmp_path: Path, text: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    return recipe


def test_environment_values_keep_their_text_others_are_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_TEST_TOKEN", SECRET)
    monkeypatch.setenv("TRAINER_TEST_SCRATCH", "/scratch/alice")
    recipe = write_recipe(
        tmp_path,
        "project: ${oc.env:TRAINER_TEST_TOKEN}\n"
        "work_dir: ${oc.env:TRAINER_TEST_SCRATCH}/runs/a\n"
        "data:\n"
        "  train: {ann_file: /data/train.json, img_dir: /data/train}\n"
        "  val:\n"
        "    ann_file: ${data.train.ann_file}\n"  # refers to a plain value: resolved
        "    img_dir: ${.ann_file}\n"
        "model:\n"
        "  backbone:\n"
        "    name: ${project}\n",  # takes the environment's value through another key
    )
    cfg = load_recipe(recipe)
    assert cfg.project == SECRET and cfg.work_dir == "/scratch/alice/runs/a"  # used
    assert cfg.model.backbone.name == SECRET

    saved = to_dict(cfg)
    assert saved["project"] == "${oc.env:TRAINER_TEST_TOKEN}"
    assert saved["work_dir"] == "${oc.env:TRAINER_TEST_SCRATCH}/runs/a"
    assert saved["model"]["backbone"]["name"] == "${project}"
    assert saved["data"]["val"]["ann_file"] == "/data/train.json"
    assert saved["data"]["val"]["img_dir"] == "/data/train.json"
    text = saved_recipe_yaml(cfg)
    assert SECRET not in text and "/scratch/alice" not in text

    # read back, it resolves again from the environment it runs in
    copy = write_recipe(tmp_path / "..", text)
    monkeypatch.setenv("TRAINER_TEST_TOKEN", "another")
    again = load_recipe(copy)
    assert again.project == again.model.backbone.name == "another"


def test_a_run_writes_no_environment_value(tmp_path):
    data = tiny_shapes(tmp_path / "shapes")
    work_dir = tmp_path / "work"
    env = dict(ENV, TRAINER_TEST_TOKEN=SECRET)
    command = train_command(
        *tiny_recipe(data, work_dir),
        "total_epochs=1",
        "workflow=[[train,1],[val,1]]",
        "trackers=[wandb]",
        "project=${oc.env:TRAINER_TEST_TOKEN}",
    )
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]

    written = [work_dir / "config.yaml", *work_dir.glob("checkpoints/*/config.yaml")]
    written += list(work_dir.glob("wandb/offline-run-*/files/config.yaml"))
    assert len(written) >= 4  # work_dir, epoch_1, best, final, W&B
    for path in written:
        text = path.read_text()
        assert SECRET not in text, path
        assert "${oc.env:TRAINER_TEST_TOKEN}" in text, path
    for weights in work_dir.glob("checkpoints/*/model.safetensors"):
        with safe_open(str(weights), "pt") as file:
            metadata = json.dumps(file.metadata())
        assert SECRET not in metadata, weights
