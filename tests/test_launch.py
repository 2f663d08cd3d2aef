"""The shipped Accelerate configs parse and describe what their names say."""

import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cpu", DistributedType.NO),
        ("single_gpu", DistributedType.NO),
        ("multi_gpu", DistributedType.MULTI_GPU),
        ("fsdp", DistributedType.FSDP),
        ("multi_node", DistributedType.MULTI_GPU),
    ],
)
def test_config_parses(name, kind):
    config = load_config_from_file(str(LAUNCH / f"{name}.yaml"))
    assert config.distributed_type == kind
    assert config.num_processes % config.num_machines == 0
    if name == "fsdp":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        # FSDP2: per-parameter sharding, units from MaskRCNN._no_split_modules
        # (tests/engine/test_fsdp.py runs this wiring on the CPU)
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config


def test_cpu_config_launches_the_entry_point():
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(LAUNCH / "cpu.yaml"),
            str(ROOT / "trainer/run.py"),
            "--help",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recipe" in result.stdout


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sh")], check=True)
