"""Tiers and models from YAML; the memory arithmetic and fit checks the router relies on."""

from __future__ import annotations

import pytest

from scheduler.catalog import PolicyError, parse_catalog
from scheduler.memory import activations_gb, fit_problem, plan_memory
from scheduler.parallel_cost import Plan
from tests.scheduler.policy_fixtures import CONFIG, shipped_catalog

TIERS = (CONFIG / "tiers.yaml").read_text()
MODELS = (CONFIG / "models.yaml").read_text()


def test_shipped_catalog_loads_with_the_render_path_fields():
    cat = shipped_catalog()
    a14b = cat.model("wan2.2-t2v-a14b")
    assert (a14b.native_width, a14b.native_height, a14b.max_frames_per_segment) == (1280, 720, 81)
    assert (a14b.guidance_high, a14b.guidance_low) == (4.0, 3.0)
    assert cat.tier("a100").gpus == 16 and cat.tier("cpu").gpus_per_actor == 0
    assert cat.model("wan-toy").bundled
    with pytest.raises(KeyError, match="'nope'"):
        cat.model("nope")


def test_a14b_single_gpu_estimate_reproduces_the_official_peak():
    """Wan2.2 README: 59.8 GB on one GPU at 720P, one expert resident at a time."""
    cat = shipped_catalog()
    a14b = cat.model("wan2.2-t2v-a14b")
    assert plan_memory(cat, a14b, Plan(), "offload").total_gb == pytest.approx(59.8, abs=0.05)
    both = plan_memory(cat, a14b, Plan(), "resident")
    assert both.weights_gb == pytest.approx(56.0)  # two 14B experts in bf16


@pytest.mark.parametrize("plan,weights,activations", [
    (Plan(tp=4), 56 / 4, 18.7 / 4),  # tp shards the linear layers and the heads
    (Plan(sp=4), 56, 18.7 / 4),  # sp splits the tokens; every rank holds whole weights
    (Plan(cfg=2), 56, 18.7),  # each CFG half: whole weights, one full pass
    (Plan(tp=2, cfg=2), 28, 18.7 / 2),
])
def test_only_tensor_parallel_shards_weights(plan, weights, activations):
    cat = shipped_catalog()
    need = plan_memory(cat, cat.model("wan2.2-t2v-a14b"), plan, "resident")
    assert (need.weights_gb, need.encoders_gb, need.overhead_gb) == \
        (pytest.approx(weights), 11.6, 1.5)
    assert need.activations_gb == pytest.approx(activations)
    assert need.total_gb == pytest.approx(weights + 11.6 + activations + 1.5)


def test_activations_scale_with_the_latent_volume():
    a14b = shipped_catalog().model("wan2.2-t2v-a14b")
    assert activations_gb(a14b) == 18.7  # measured: one 81-frame segment at 1280x720
    # One frame: 1 latent frame of the segment's 21.
    assert activations_gb(a14b, frames=1) == pytest.approx(18.7 / 21)
    # 832x480 is 60x104 latent cells against 90x160: 8.1 GB, against 7.2 GB measured.
    smaller = activations_gb(a14b, size="832x480")
    assert smaller == pytest.approx(18.7 * 60 * 104 / (90 * 160))
    assert abs(smaller - a14b.activation_gb["832x480"]) / a14b.activation_gb["832x480"] < 0.15


def test_fit_problems_say_why_and_by_how_much():
    cat = shipped_catalog()
    a14b, a10, a100 = cat.model("wan2.2-t2v-a14b"), cat.tier("a10"), cat.tier("a100")
    too_big = fit_problem(cat, a14b, a10, 1, "resident")
    assert "87.8 GB per GPU" in too_big and "has 24 GB: 63.8 GB over" in too_big
    # The full model on four A10s: even tp4 with the other expert offloaded is over.
    assert "the smallest, tp4, needs" in fit_problem(cat, a14b, a10, 4, "offload")
    assert "0.8 GB over" in fit_problem(cat, a14b, a10, 4, "offload")
    assert "degree 3 does not divide wan2.2-t2v-a14b's 40 attention heads" in \
        fit_problem(cat, a14b, a100, 3, "resident")
    light = cat.model("wan2.2-ti2v-5b")
    assert "tier a10 has 4 per node" in fit_problem(cat, light, a10, 8, "resident")
    assert fit_problem(cat, a14b, a100, 2, "resident") is None
    assert "two experts" in fit_problem(cat, light, a10, 1, "split")
    assert fit_problem(cat, light, a10, 1, "resident") is None
    # split: one group per expert, the pair on one node: twice the degree's GPUs a node.
    toy, cpu = cat.model("wan-toy"), cat.tier("cpu")
    assert fit_problem(cat, toy, cpu, 1, "split") is None
    assert ("two groups of 2 GPUs on one node; tier cpu has 2 per node"
            in fit_problem(cat, toy, cpu, 2, "split"))


@pytest.mark.parametrize("old,new,words", [
    ("memory_gb: 24", "memory_gb: -24", "tiers.a10: memory_gb: Input should be greater than 0 (got -24)"),
    ("gpus_per_node: 4", "gpus_per_node: four", "tiers.a10: gpus_per_node"),
    ("ray_resource: \"tier:a10\"", "ray_resource: \"tier:a10\"\n    colour: red", "tiers.a10: colour: Extra inputs"),
])
def test_bad_tiers_name_entry_and_field(old, new, words):
    with pytest.raises(PolicyError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_catalog(TIERS.replace(old, new, 1), MODELS)


@pytest.mark.parametrize("old,new,words", [
    ("degrees: [1, 2, 4, 5, 8]", "degrees: [1, 3]", "degrees [1, 3] must be non-empty divisors of the 40"),
    ("max_frames: 81", "max_frames: 80", "max_frames must be 4k+1, got 80"),
    ("activation_gb: {1280x720: 18.7, 832x480: 7.2}", "activation_gb: {832x480: 7.2}",
     "no entry for the native size '1280x720'"),
    ("seconds_per_step: {a100: 68.4, a10: 210.0}", "seconds_per_step: {h100: 30}",
     "unknown tier 'h100'"),
])
def test_bad_models_name_entry_and_field(old, new, words):
    with pytest.raises(PolicyError, match="wan2.2-t2v-a14b") as err:
        parse_catalog(TIERS, MODELS.replace(old, new, 1))
    assert words in str(err.value)
