"""One rank of the FSDP wiring check (started by tests/engine/test_fsdp.py under torchrun).

Accelerate refuses FSDP without a GPU, so this applies what Accelerate's FSDP2 path does
with launch/fsdp.yaml (its plugin, its auto-wrap policy over the model's units, its full
state dict gathering) with torch's ``fully_shard`` on a CPU mesh over gloo, then checks one
training step against an unsharded copy that averages its gradients over the ranks (what
DDP does). Writes the gathered state dict to ``argv[1]`` from rank 0.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import (
    fsdp2_prepare_auto_wrap_policy,
    get_module_children_bottom_up,
)
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from tests.models.conftest import box_target, lean_model_config
from trainer.models import build_detector

ROOT = Path(__file__).resolve().parents[2]


def plugin_from_launch_config() -> FullyShardedDataParallelPlugin:
    fsdp = yaml.safe_load((ROOT / "launch/fsdp.yaml").read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"].lower(),
        state_dict_type=fsdp["fsdp_state_dict_type"],
        reshard_after_forward=fsdp["fsdp_reshard_after_forward"],
    )


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)
    cfg = lean_model_config(name="test_resnet", frozen_stages=1, frozen_bn=True)
    model = build_detector(cfg, num_classes=3)
    reference = copy.deepcopy(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen, "the check needs frozen parameters next to trainable ones"

    plugin = plugin_from_launch_config()
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in get_module_children_bottom_up(model)[:-1] if policy(m)]
    unit_classes = {type(m).__name__ for m in units}  # before fully_shard renames them
    for module in units:
        if not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert {"FPN", "RegionProposalNetwork", "BoxHead", "MaskHead"} <= unit_classes, unit_classes
    assert {"BasicBlock", "Bottleneck"} & unit_classes, unit_classes

    # Each rank its own image; the same sampling randomness for both models.
    g = torch.Generator().manual_seed(rank)
    image = torch.rand(3, 64, 64, generator=g)
    target = box_target(64, 64, [[6 + 8 * rank, 10, 40, 50], [30, 4, 60, 30]], [1, 3])
    lr = 0.1
    for net in (model, reference):
        net.train()
        torch.manual_seed(100 + rank)
        losses = net([image], [target])
        sum(losses.values()).backward()
    for param in reference.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world
    for net in (model, reference):
        torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr).step()

    # What accelerator.get_state_dict does for FSDP2: a full CPU state dict, on rank 0 only.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    gathered = get_model_state_dict(model, options=options)
    if rank == 0:
        check_state_dict(gathered, reference, frozen, initial)
        save_file({k: v.contiguous() for k, v in gathered.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


def check_state_dict(gathered: dict, reference: torch.nn.Module, frozen: dict, initial: dict):
    expected = reference.state_dict()
    assert list(gathered) == list(expected), "state dict keys differ from the plain model's"
    for name, value in expected.items():
        torch.testing.assert_close(gathered[name], value, atol=1e-5, rtol=1e-4, msg=name)
    for name, before in frozen.items():
        assert torch.equal(gathered[name], before), f"frozen {name} changed"
    moved = [n for n, before in initial.items() if not torch.equal(gathered[n], before)]
    assert len(moved) > len(initial) // 2, "the step left most trainable weights unchanged"


if __name__ == "__main__":
    main(sys.argv[1])
