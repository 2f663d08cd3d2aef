import json

import wandb
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker

from tests.engine.toy import ToyDataset, toy_model, train_toy
from trainer.engine.logging import MetricsLog, flatten


class RecordingTracker(GeneralTracker):
    """An in-memory tracker: what a tracker service would receive."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.config, self.logged, self.finished = None, [], False

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


class BrokenTracker(RecordingTracker):
    """A tracker whose service is down: every call raises."""

    name = "broken"

    def store_init_configuration(self, *args, **kwargs):
        raise ConnectionError("service unavailable")

    log = finish = store_init_configuration


class UnstartableTracker(RecordingTracker):
    name = "unstartable"

    def start(self):
        raise PermissionError("not logged in")


def test_flatten_gives_dotted_scalars():
    config = {"optimizer": {"lr": 0.02, "betas": [0.9, 0.999]}, "seed": 1, "resume": None}
    assert flatten(config) == {
        "optimizer.lr": 0.02,
        "optimizer.betas": "[0.9, 0.999]",
        "seed": 1,
        "resume": None,
    }


def test_failing_trackers_never_stop_training_nor_the_other_trackers(tmp_path):
    recording = RecordingTracker()
    records = train_toy(
        tmp_path,
        toy_model(),
        ToyDataset(n=4),
        log_with=[UnstartableTracker(), BrokenTracker(), recording],
    )
    assert len(records) == 4  # training went on
    assert recording.config["optimizer.lr"] == 0.1  # the resolved recipe, flattened
    assert [step for step, _ in recording.logged] == [1, 2, 3, 4]
    step, values = recording.logged[-1]
    assert values["train/loss_reg"] == records[-1]["loss_reg"] and "train/lr" in values
    assert recording.finished
    log = (tmp_path / "log.txt").read_text()
    assert "tracker unstartable failed (start): PermissionError: not logged in" in log
    assert log.count("tracker broken failed (log)") == 1  # warned once, not per call
    assert "tracker broken failed (config)" in log and "tracker broken failed (finish)" in log


def test_wandb_offline_receives_the_recipe_and_losses(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train_toy(tmp_path, toy_model(), ToyDataset(n=2), "trackers=[wandb]")
    wandb.teardown()  # the wandb service writes the run file in the background
    (run,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    content = run.read_bytes()
    assert b"optimizer.accumulation_steps" in content and b"train/loss_reg" in content


def test_metrics_go_to_a_work_dir_not_made_yet(tmp_path):
    work_dir = tmp_path / "new" / "run"
    log = MetricsLog(work_dir, Accelerator(cpu=True))
    log.write({"phase": "train", "epoch": 1, "iter": 1, "loss": 0.5, "nan": float("nan")})
    assert json.loads((work_dir / "metrics.jsonl").read_text()) == {
        "phase": "train",
        "epoch": 1,
        "iter": 1,
        "loss": 0.5,
        "nan": None,
    }
