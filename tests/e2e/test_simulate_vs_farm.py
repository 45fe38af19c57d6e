"""The fleet simulator against the live farm (issue #14, item 4): the same small trace,
submitted to the farm and simulated with the farm's own tiers and rules files, gets the
same routes and the same admission order.

The farm's `cpu` tier has one node of 2 slots. Two long blockers fill it; six tiny jobs of
three projects and four priorities, one of them tensor-parallel on both slots (the project
`parallel`), are submitted held, then released while the blockers render, so all six wait
together: admission then lets them through by priority, the two-slot job stopping the line
until both slots are free, and the order is read from their `dispatched_at`.
"""

from __future__ import annotations

import uuid

import pytest

from scheduler.simulate.engine import simulate
from scheduler.simulate.fleet import PolicyFiles, parse_fleet
from scheduler.simulate.workload import parse_line
from tests.e2e.test_render_flow import wait_for

pytestmark = pytest.mark.e2e
TINY = {"model": "wan-tiny", "frames": 5, "steps": 2, "width": 64, "height": 64}
BLOCKER = TINY | {"steps": 60}  # both slots, for a few seconds
SIX = [("sim-a", 50), ("parallel", 90), ("sim-b", 70), ("sim-a", 70), ("sim-b", 30),
       ("sim-a", 90)]  # (project, priority) in submission order
ROUTE_FIELDS = ("variant", "tier", "degree", "placement", "parallel", "queue", "rule",
                "fallback", "est_seconds")


def test_the_simulator_admits_and_routes_a_small_trace_as_the_farm_does(
        project_client, settings, celery_workers):
    run = uuid.uuid4().hex[:8]  # prompts never seen before: no result-cache answers
    blockers = [BLOCKER | {"prompt": f"blocker {i} {run}", "seed": i, "project": "sim-block"}
                for i in range(2)]
    six = [TINY | {"prompt": f"job {i} {run}", "seed": 100 + i, "project": project,
                   "priority": priority} for i, (project, priority) in enumerate(SIX)]
    clients = {p: project_client(p) for p in {"sim-block"} | {p for p, _ in SIX}}
    try:
        held = [clients[b["project"]].post("/v1/jobs", json=b | {"hold": True}).json()["id"]
                for b in six]
        blocking = [clients["sim-block"].post("/v1/jobs", json=b).json()["id"]
                    for b in blockers]
        for job_id, body in zip(held, six):
            released = clients[body["project"]].patch(f"/v1/jobs/{job_id}",
                                                      json={"hold": False})
            assert released.status_code == 200, released.text
        live = [clients[b["project"]].get(f"/v1/jobs/{j}").json() for j, b in zip(held, six)]
        assert all(job["dispatched_at"] is None for job in live), \
            "a blocker left the slots before the six were released: make the blockers longer"
        done = [wait_for(clients[b["project"]], j, {"succeeded", "failed"}, timeout=180)
                for j, b in zip(blocking + held, blockers + six)]
    finally:
        for client in clients.values():
            client.close()
    assert {job["state"] for job in done} == {"succeeded"}, [j["error"] for j in done]
    live_six = done[2:]
    live_order = sorted(range(6), key=lambda i: live_six[i]["dispatched_at"])

    trace = [parse_line(b | {"at": 0}, "blocker") for b in blockers]
    trace += [parse_line(b | {"at": 0.1 * (i + 1)}, f"job {i}") for i, b in enumerate(six)]
    files = PolicyFiles(**{name: str(getattr(settings, name)) for name in
                           ("tiers_file", "models_file", "rules_file", "variants_file")
                           if getattr(settings, name) and getattr(settings, name).is_file()})
    fleet = parse_fleet("admission: {pass_every_s: 0}\n", "e2e-fleet.yaml", overrides=files)
    result = simulate(fleet, trace, hours=1.0)
    sim_six = result.jobs[2:]
    sim_order = [int(job_id[1:]) - 2 for _, job_id, _ in result.admissions[2:]]

    # Priority first, the two-slot job stopping the line; ties to the earlier submission.
    assert live_order == [1, 5, 2, 3, 0, 4]
    assert sim_order == live_order
    for live_job, sim_job in zip(live_six, sim_six):
        assert {k: live_job["route"][k] for k in ROUTE_FIELDS} == \
            {k: sim_job.route_dict[k] for k in ROUTE_FIELDS}
    assert (sim_six[1].route.degree, sim_six[1].route.rule) == (2, "tensor-parallel-project")
    assert {j.state for j in result.jobs} == {"succeeded"}
