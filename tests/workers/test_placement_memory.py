"""Memory-true placement (issue #11.3): where each expert's parameters are materialised while
the tiny two-expert checkpoint loads, through the actor's own hook (workers/parallel/placement.py).

The target device is "meta": on a CPU-only machine it is the one device whose tensors cannot
be confused with host memory, so "on the device" and "in host memory" are told apart by each
tensor's device. A tensor shared by both experts (offload's device buffers) counts once.
"""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors import safe_open

from workers.actor import HANDOVERS_KEPT, RenderWorker
from workers.parallel.placement import (
    ExpertOffload, NotOnThisGroup, apply_placement, expert_loader,
)
from workers.parallel.tensor_parallel import load_sharded
from workers.wan_pipeline import RenderRequest, WanT2V

DEVICE = torch.device("meta")


def expert_bytes(folder) -> int:
    """One expert's tensors as it runs: its checkpoint's weights (fp32 here) and the
    buffers it builds itself (rotary tables)."""
    from diffusers import WanTransformer3DModel

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                total += torch.Size(fh.get_slice(key).get_shape()).numel() * 4
    model = WanTransformer3DModel.from_pretrained(folder)
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def tensors(module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def device_bytes(modules) -> int:
    """Bytes on the target device held by ``modules``' tensors, each tensor once."""
    seen = {}
    for module in modules:
        for t in tensors(module):
            if t.device.type == DEVICE.type:
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def load_recording(tiny_model, placement, role, inner=None):
    """Load with the actor's hook, recording after each expert: the device types its tensors
    were materialised on, and the device bytes of every expert loaded so far."""
    hook = expert_loader(placement, role, inner)
    loaded, records = [], []

    def recording(cls, folder, device, dtype):
        model = hook(cls, folder, device, dtype)
        loaded.append(model)
        records.append((folder.name, {t.device.type for t in tensors(model)},
                        device_bytes(loaded)))
        return model

    pipeline = WanT2V.from_folder(tiny_model, DEVICE, torch.float32, load_expert=recording)
    apply_placement(pipeline, placement, role, DEVICE)
    return pipeline, records


def test_resident_loads_both_experts_onto_the_device(tiny_model):
    one = expert_bytes(tiny_model / "transformer")
    pipeline, records = load_recording(tiny_model, "resident", None)
    assert records == [("transformer", {"meta"}, one), ("transformer_2", {"meta"}, 2 * one)]
    assert device_bytes(pipeline.experts) == 2 * one


def test_offload_reads_both_experts_into_host_memory_and_the_device_holds_one(tiny_model):
    one = expert_bytes(tiny_model / "transformer")
    pipeline, records = load_recording(tiny_model, "offload", None)
    # While loading, nothing of either expert is created on the device.
    assert records == [("transformer", {"cpu"}, 0), ("transformer_2", {"cpu"}, 0)]
    # After: both experts run on one expert's worth of device buffers ...
    assert device_bytes(pipeline.experts) == one
    high, low = (tensors(e) for e in pipeline.experts)
    assert all(a is b for a, b in zip(high, low))
    # ... and the host keeps both experts' weights, the copies the swap reads from.
    offload = pipeline.expert_for.__self__
    assert isinstance(offload, ExpertOffload)
    for which in ("high", "low"):
        host = offload.host[which].values()
        assert {t.device.type for t in host} == {"cpu"}
        assert sum(t.numel() * t.element_size() for t in host) == one


@pytest.mark.parametrize("role", ["high", "low"])
def test_split_reads_only_its_own_expert(tiny_model, role):
    one = expert_bytes(tiny_model / "transformer")
    pipeline, records = load_recording(tiny_model, "split", role)
    mine = "transformer" if role == "high" else "transformer_2"
    for name, devices, _ in records:
        assert devices == ({"meta"} if name == mine else set()), (name, devices)
    assert max(r[2] for r in records) == one
    other = pipeline.transformer_2 if role == "high" else pipeline.transformer
    assert isinstance(other, NotOnThisGroup)
    assert device_bytes(pipeline.experts) == one


@pytest.mark.parametrize("placement,role", [("offload", None), ("split", "low")])
def test_placement_composes_with_the_tensor_parallel_loader(tiny_model, placement, role):
    """Rank 1 of tp2 (loading touches no collective: no process group needed): the plan's
    loader reads its half of each expert, the placement decides where that half goes."""
    def shard(cls, folder, device, dtype):
        return load_sharded(cls, folder, None, 1, 2, device, dtype)

    pipeline, records = load_recording(tiny_model, placement, role, inner=shard)
    halves = [e for e in pipeline.experts if not isinstance(e, NotOnThisGroup)]
    assert all(e.tp_rank == 1 and e.blocks[0].attn1.heads == 1 for e in halves)
    one_shard = device_bytes(halves[:1])
    assert 0 < one_shard < expert_bytes(tiny_model / "transformer")
    if placement == "offload":
        assert records == [("transformer", {"cpu"}, 0), ("transformer_2", {"cpu"}, 0)]
    else:
        assert records == [("transformer", set(), 0),
                           ("transformer_2", {"meta"}, one_shard)]
    assert device_bytes(pipeline.experts) == one_shard


def test_offload_swaps_by_copying_into_the_same_buffers(tiny_model):
    """On CPU (no pinning), offload renders what resident renders, switches experts by copy
    into buffers that stay put render after render."""
    req = RenderRequest("a red circle moving left", "", frames=5, height=32, width=32,
                        steps=4, guidance_high=4.0, guidance_low=3.0, seed=3)
    resident = WanT2V.from_folder(tiny_model, "cpu", torch.float32,
                                  load_expert=expert_loader("resident", None))
    # from_pretrained's CPU tensors are views into the safetensors file, 8-byte aligned; CPU
    # kernels sum in another order on those (~3e-7 apart). Fresh memory, as offload's
    # buffers (and any .to("cuda")) are, makes the comparison exact.
    for expert in resident.experts:
        for param in expert.parameters():
            param.data = param.data.clone()
    want = resident.denoise(req)
    cpu = torch.device("cpu")
    offload = WanT2V.from_folder(tiny_model, cpu, torch.float32,
                                 load_expert=expert_loader("offload", None))
    apply_placement(offload, "offload", None, cpu)
    swap = offload.expert_for.__self__
    before = {name: t.data_ptr() for name, t in swap.device_tensors.items()}
    holding = []
    for _ in range(2):
        for *_, which, _latents in offload.denoise_steps(req):
            holding.append((which, swap.holding))
        assert torch.equal(offload.denoise(req), want)
    assert all(which == held for which, held in holding)
    assert {which for which, _ in holding} == {"high", "low"}
    assert {name: t.data_ptr() for name, t in swap.device_tensors.items()} == before


def test_offload_and_split_refuse_a_bad_role_or_placement():
    with pytest.raises(ValueError, match="'middle'"):
        expert_loader("split", "middle")
    with pytest.raises(ValueError, match="'everywhere'"):
        expert_loader("everywhere", None)


def test_high_noise_rank_keeps_handovers_until_released_and_no_more_than_its_bound(ray_head):
    """The refs the high-noise rank put stay alive until `release_handover`; a driver that
    never releases cannot grow the table past HANDOVERS_KEPT (the oldest go first)."""
    worker = RenderWorker("wan-tiny", "unused", placement="split", role="high")
    refs = {}
    for i in range(HANDOVERS_KEPT + 5):
        refs[f"r{i}"] = ray.put(torch.full((2,), float(i)))
        worker._keep_handover(f"r{i}", refs[f"r{i}"])
    held = worker.handovers_held()
    assert held == [f"r{i}" for i in range(5, HANDOVERS_KEPT + 5)]
    worker.release_handover("r7")
    worker.release_handover("never-handed-over")  # a no-op
    assert "r7" not in worker.handovers_held()
    assert len(worker.handovers_held()) == HANDOVERS_KEPT - 1
    assert ray.get(refs["r9"]).tolist() == [9.0, 9.0]
