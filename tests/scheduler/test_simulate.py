"""The fleet simulator (issue #14, item 4): seeded runs repeat, a window's batch starts when
the window opens, quotas hold, failures are retried, and the report's numbers on a tiny
trace are the ones worked out by hand below. The policy is the shipped one."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest

from scheduler.simulate.engine import simulate
from scheduler.simulate.fleet import FleetError, parse_fleet
from scheduler.simulate.report import format_report, summarise
from scheduler.simulate.workload import TraceError, TraceJob, make_trace, parse_trace

EXACT = "admission: {pass_every_s: 0}\n"  # a pass at every arrival and finish, as the farm
DRAFT_S = 280.0  # wan2.2-ti2v-5b-int8 on an A10: 20 steps x 14 s, 17 frames render 121


def draft(at: float, n: int, **kw) -> TraceJob:
    return TraceJob(at_s=at, prompt=f"shot {n}", track="draft", steps=20, seed=n, **kw)


def fleet(extra: str = "", a10: int = 4):
    return parse_fleet(f"tiers: {{a10: {{gpus: {a10}, gpus_per_node: 4, "
                       f"cost_per_gpu_hour: 1.0}}}}\n" + extra)


def test_the_report_on_a_tiny_trace_is_the_hand_worked_one():
    """4 A10s. Five drafts at 0: four start at once, the fifth when the first leaves (280 s)
    and ends at 560 s, past its 500 s deadline. At 300 s a repeat of the first is answered
    by the cache. Waits of the rendered: 0,0,0,0,280 -> p50 0, p95 0.8*280 = 224, p99
    0.96*280 = 268.8. GPU-seconds: 5 x 280 = 1400 of 4 x 3600 in the hour: 9.72%; at $1 a
    GPU-hour $0.3889, over 6 videos $0.0648."""
    trace = [draft(0, i) for i in range(4)] + [draft(0, 4, deadline_s=500.0)]
    trace.append(draft(300, 0))  # the same request as the first
    summary = summarise(simulate(fleet(EXACT), trace, hours=1.0))
    assert summary["states"] == {"cached": 1, "succeeded": 5}
    assert summary["waits"][("draft", "a10")] == pytest.approx((5, 0.0, 224.0, 268.8))
    assert summary["waits"][("draft", "cache")] == (1, 0.0, 0.0, 0.0)
    assert summary["tiers"]["a10"]["utilisation"] == pytest.approx(1400 / 14400)
    assert summary["cost"] == pytest.approx(1400 / 3600)
    assert summary["cost_per_video"] == pytest.approx(1400 / 3600 / 6)
    assert (summary["deadline_jobs"], summary["deadline_missed"]) == (1, 1)
    assert summary["end_s"] == pytest.approx(2 * DRAFT_S)
    assert "deadlines missed: 1 of 1" in format_report(summary)


def test_a_seeded_day_repeats_exactly_and_another_seed_differs():
    chosen = fleet("failures: {per_gpu_hour: 2.0, retry_delay_s: 30}\n", a10=8)
    trace = make_trace(300, seed=3, hours=2)

    def run(seed):
        result = simulate(chosen, trace, hours=2.0, seed=seed)
        return result.admissions, [(j.state, j.attempts, j.finished_s) for j in result.jobs]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert make_trace(300, seed=3, hours=2) == trace


def test_a_batch_waits_for_its_window_and_starts_when_it_opens():
    """Submitted at 20:00 with the window 22:00-06:00: admitted at 22:00 sharp, while a
    draft without a window submitted later starts at once."""
    trace = [draft(20 * 3600, 1, batch="night", window="22:00-06:00"),
             draft(20 * 3600 + 60, 2)]
    result = simulate(fleet(EXACT), trace, hours=24.0)
    night, now = result.jobs
    assert night.admitted_s == 22 * 3600 and now.admitted_s == 20 * 3600 + 60
    summary = summarise(result)
    assert summary["batches"] == {"night": (1, 1, True)}


def test_a_projects_quota_caps_its_gpus_while_another_project_runs(tmp_path):
    """Quota 2 A10s per project (the rules file's default is 8): six drafts of `ads` and
    two of `film` on 8 A10s: never more than 2 of `ads` at once, and `film` is not kept
    waiting behind them."""
    chosen = quota_fleet(tmp_path, 2, EXACT)
    trace = [draft(i, i, project="ads") for i in range(6)]
    trace += [draft(10, 10, project="film"), draft(11, 11, project="film")]
    result = simulate(chosen, trace, hours=1.0)
    spans = [(j.admitted_s, j.finished_s, j.trace.project) for j in result.jobs]
    for t, _, _ in spans:
        running = [p for a, f, p in spans if a <= t < f]
        assert running.count("ads") <= 2
    assert [a for a, _, p in spans if p == "film"] == [10, 11]
    assert sorted(a for a, _, p in spans if p == "ads") == [0, 1, 280, 281, 560, 561]


def quota_fleet(tmp_path, a10_quota: int, extra: str):
    """8 A10s, the shipped rules with a quota of ``a10_quota`` A10s per project."""
    import yaml

    from farm.policy import CONFIG_DIR

    rules = yaml.safe_load((CONFIG_DIR / "rules.yaml").read_text())
    rules["quotas"]["default"]["a10"] = a10_quota
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return fleet(extra + f"policy: {{rules_file: {path}}}\n", a10=8)


@pytest.mark.parametrize("pages, b_starts", [(1, DRAFT_S + 1), (2, 10.0)])
def test_a_pass_reads_further_pages_only_while_the_tier_has_room(tmp_path, pages, b_starts):
    """Pages of 2 waiting jobs. `ads` (priority 90) holds its quota of 2 and has two more
    waiting: the first page is those two, passed over. With one page `film`'s job behind
    them waits until the page holds it (at 281 s, when `ads`'s last two went); with two
    pages it goes at once (farm.jobs.admit's paging)."""
    chosen = quota_fleet(tmp_path, 2, "admission: {pass_every_s: 0, lookahead: 2, "
                                      f"pages: {pages}}}\n")
    trace = [draft(i, i, project="ads", priority=90) for i in range(4)]
    trace.append(draft(10, 10, project="film"))
    result = simulate(chosen, trace, hours=1.0)
    assert result.jobs[-1].admitted_s == b_starts
    assert [j.admitted_s for j in result.jobs[:4]] == [0, 1, DRAFT_S, DRAFT_S + 1]


def test_failures_are_retried_and_a_job_past_its_retries_fails_with_why():
    trace = [draft(i, i) for i in range(20)]
    retried = simulate(fleet("failures: {per_gpu_hour: 6.0, retry_delay_s: 10, "
                             "max_retries: 50}\n" + EXACT), trace, hours=4.0, seed=1)
    assert sum(j.attempts for j in retried.jobs) > 0
    assert all(j.state == "succeeded" for j in retried.jobs)
    # A retried job's GPU time is more than one render: the lost part of a failed attempt.
    assert max(j.gpu_s for j in retried.jobs) > DRAFT_S
    failed = simulate(fleet("failures: {per_gpu_hour: 60.0, max_retries: 0}\n" + EXACT),
                      trace, hours=4.0, seed=1)
    lost = [j for j in failed.jobs if j.state == "failed"]
    assert lost and lost[0].why == "failed 1 times on a10"


def test_a_final_with_a_deadline_the_a100s_cannot_meet_spills_to_the_a10s():
    """The rule's fallback (deadline_unmet), on the simulated queue's backlog."""
    finals = [TraceJob(at_s=i, prompt=f"f{i}", track="final", frames=81, seed=i)
              for i in range(40)]
    late = TraceJob(at_s=50, prompt="rush", track="final", frames=81, seed=99,
                    deadline_s=3000.0)
    chosen = parse_fleet("tiers: {a10: {gpus: 4, gpus_per_node: 4}, "
                         "a100: {gpus: 8, gpus_per_node: 8}}\n" + EXACT)
    result = simulate(chosen, finals + [late], hours=1.0)
    rush = result.jobs[-1]
    assert (rush.route.tier, rush.route.fallback, rush.route.rule) == ("a10", 0, "finals")
    assert {j.route.tier for j in result.jobs[:-1]} == {"a100"}


@pytest.mark.parametrize("text, message", [
    ("tiers: {a10: {gpus: 6, gpus_per_node: 4}}", "tiers.a10.gpus: got 6: not a multiple"),
    ("tiers: {a10: {gpus: -1}}", "tiers.a10.gpus: Input should be greater than or equal"),
    ("tiers: {h9: {gpus: 8}}", "tiers.h9: tier 'h9' is not in the policy's tiers"),
    ("failures: {per_gpu_hour: fast}", "failures.per_gpu_hour: Input should be a valid"),
    ("measured: {wan-nope: {a10: 1.0}}", "measured.wan-nope: unknown model 'wan-nope'"),
    ("policy: {rules_file: /no/such.yaml}", "policy.rules_file: no file at '/no/such.yaml'"),
])
def test_a_bad_fleet_file_names_the_field_and_the_value(text, message):
    with pytest.raises(FleetError, match=message.replace("(", r"\(")):
        parse_fleet(text, "fleet.yaml")


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x"}, "line 1: field 'at': missing"),
    ({"at": "25:00", "prompt": "x"}, "field 'at': got '25:00'"),
    ({"at": 0, "prompt": "x", "frames": "many"}, "field 'frames': got 'many'"),
    ({"at": 0, "prompt": "x", "track": "rough"}, "field 'track': got 'rough'"),
    ({"at": 0, "prompt": "x", "window": "22-06"}, "window '22-06'"),
])
def test_a_bad_trace_line_names_the_line_the_field_and_the_value(line, message):
    with pytest.raises(TraceError, match=message):
        parse_trace([json.dumps(line)])


def test_trace_times_read_as_seconds_or_clock_and_sort_stably():
    jobs = parse_trace(['{"at": "09:30", "prompt": "b"}', '{"at": 34200, "prompt": "c"}',
                        '{"at": 5, "prompt": "a", "batch": "n1", "window": "22:00-06:00"}'])
    assert [(j.prompt, j.at_s) for j in jobs] == [("a", 5.0), ("b", 34200), ("c", 34200.0)]
    assert jobs[0].batch == "n1" and str(timedelta(seconds=jobs[1].at_s)) == "9:30:00"


def test_holdings_given_as_whole_nodes_decide_as_one_entry_per_group():
    """engine.held_as: the admission decision is the same as with one Holding per group
    (as farm/jobs/admit.py builds them) on a tier whose groups share a degree, over seeded
    random states."""
    import random
    from datetime import datetime, timezone

    from scheduler.admission import Holding, TierSize, Waiting, select_for_release
    from scheduler.rules import Quotas
    from scheduler.simulate.engine import TierState, held_as

    rng = random.Random(5)
    for trial in range(200):
        per_node, degree = rng.choice([(4, 1), (8, 2), (8, 1), (8, 4)])
        size = TierSize(rng.randint(1, 12), per_node)
        st = TierState(size, 1.0)
        room = size.nodes * per_node // degree
        for _ in range(rng.randint(0, room)):
            st.holding[f"p{rng.randrange(4)}", degree] += 1
        each = [Holding(p, "t", d, 1) for (p, d), n in st.holding.items() for _ in range(n)]
        rng.shuffle(each)  # the database's rows come in any order
        quotas = Quotas(default={"t": rng.choice([per_node, 3 * per_node, 1000])})
        waiting = [Waiting(f"w{i}", f"p{rng.randrange(4)}", "t",
                           rng.choice([degree, degree * 2 if degree * 2 <= per_node else degree]),
                           rng.choice([10, 50, 90]), datetime(2026, 1, 1, tzinfo=timezone.utc),
                           rng.randint(1, 3)) for i in range(rng.randint(1, 12))]
        tiers = {"t": size}
        coarse = select_for_release(waiting, held_as(st, "t"), tiers, quotas)
        fine = select_for_release(waiting, each, tiers, quotas)
        # The same jobs go, wait and are refused (a message may list the nodes' free GPUs
        # in another order: full nodes sit elsewhere).
        assert (coarse.released, coarse.impossible, set(coarse.held)) == \
            (fine.released, fine.impossible, set(fine.held)), trial
        assert sum(h.gpus for h in held_as(st, "t")) == sum(h.gpus for h in each)


def test_farm_simulate_writes_a_trace_then_reports_and_plots_a_day(tmp_path):
    from typer.testing import CliRunner

    from farm.cli.main import app
    from farm.policy import CONFIG_DIR

    runner = CliRunner()
    trace = tmp_path / "trace.jsonl"
    made = runner.invoke(app, ["simulate", "--make-trace", "300", "--out", str(trace)])
    assert made.exit_code == 0 and len(trace.read_text().splitlines()) == 300, made.output
    day = runner.invoke(app, ["simulate", "--fleet", str(CONFIG_DIR / "fleet.example.yaml"),
                              "--workload", str(trace), "--hours", "24",
                              "--out", str(tmp_path / "plots")])
    assert day.exit_code == 0, day.output
    assert "wait p50" in day.output and "overnight batches finished by 06:00" in day.output
    assert "300 jobs: " in day.output and "cost per video: $" in day.output
    # Issue #15: the four runs on the same trace, one line each.
    assert "deadlines with and without preemption and batching" in day.output
    for run in ("neither", "preemption", "batching", "both"):
        assert sum(line.startswith(run + " ") for line in day.output.splitlines()) == 1
    for name in ("queue_depth.png", "utilisation.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "fleet.yaml"
    bad.write_text("tiers: {a10: {gpus: 5, gpus_per_node: 4}}\n")
    refused = runner.invoke(app, ["simulate", "--fleet", str(bad), "--workload", str(trace)])
    assert refused.exit_code == 2
    assert "tiers.a10.gpus: got 5: not a multiple of gpus_per_node (4)" in refused.output


# ---- issue #15: EDF, preemption and batching, and the four-run comparison -----------------

FINAL_S = 1609.4  # wan2.2-t2v-a14b on two A100s: 40 steps x 68.4 s / (2 x 0.85), rounded
STEP_S = FINAL_S / 40


def scheduling_fleet(tmp_path, extra: str = ""):
    """2 A100s (one final at a time), 4 A10s; the shipped rules with the finals' deadline
    fallback left out (so an urgent final stays on the A100s: preempt_at 90, margin 20),
    drafts batching 4 at a time at 0.25 of a solo render per extra member; passes on a 5 s
    tick, so like drafts arriving together meet in one page."""
    import yaml

    from farm.policy import CONFIG_DIR

    rules = yaml.safe_load((CONFIG_DIR / "rules.yaml").read_text())
    finals = next(r for r in rules["rules"] if r["name"] == "finals")
    finals.pop("fallbacks")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return parse_fleet(
        f"policy: {{rules_file: {path}}}\n"
        "tiers: {a10: {gpus: 4, gpus_per_node: 4, cost_per_gpu_hour: 1.0}, "
        "a100: {gpus: 2, gpus_per_node: 2}}\n"
        "admission: {pass_every_s: 5}\n"
        "batching: {wan2.2-ti2v-5b-int8: {max_batch: 4, batch_marginal: 0.25}}\n" + extra)


def urgent_final_trace() -> list[TraceJob]:
    """A final at priority 50 takes both A100s at 0; at 60 s an urgent final (priority 90)
    wants them, due 1800 s after it arrives."""
    return [TraceJob(at_s=0, prompt="long", track="final", frames=81, seed=1),
            TraceJob(at_s=60, prompt="urgent", track="final", frames=81, seed=2, priority=90,
                     deadline_s=1800.0)]


def drafts_trace(n: int = 16, deadline_s: float = 1000.0) -> list[TraceJob]:
    return [draft(1, 100 + i, deadline_s=deadline_s) for i in range(n)]


def test_edf_admits_the_earliest_deadline_of_a_band_first_and_a_higher_band_before_it():
    """One A10 busy from 0 to 280 s; waiting at 1 s: a band-5 draft (priority 55) due at
    5000 s, a band-5 draft (priority 50) due at 900 s, a band-9 draft with none. At 280 s
    the band-9 one goes, at 560 s the one due at 900 s (ends 840: in time); by priority
    alone the 55 would go first and the one due at 900 s would end at 1120 s."""
    trace = [draft(0, 0), draft(1, 1, priority=55, deadline_s=5000.0),
             draft(1, 2, priority=50, deadline_s=900.0), draft(1, 3, priority=95)]
    one_a10 = parse_fleet("tiers: {a10: {gpus: 1, gpus_per_node: 1}}\n" + EXACT)
    result = simulate(one_a10, trace, hours=1.0)
    admitted = {j.trace.seed: j.admitted_s for j in result.jobs}
    assert admitted == {0: 0, 3: DRAFT_S, 2: 2 * DRAFT_S, 1: 3 * DRAFT_S}
    assert summarise(result)["deadline_missed"] == 0


def test_preemption_saves_an_urgent_finals_deadline_and_loses_no_work(tmp_path):
    """The long final starts on the first tick (5 s). Without preemption the urgent one
    waits for it (1609 s) and ends near 3225 s, past 1860. With it, asked on the tick at
    65 s, the long one yields at its next step boundary (2 steps done, at 85.5 s), the
    urgent one starts on the next tick (90 s) and ends in time; the long one resumes with
    its 2 steps kept: its GPU time is one render's, not more."""
    chosen, trace = scheduling_fleet(tmp_path), urgent_final_trace()
    plain = simulate(chosen, trace, hours=1.0, preemption=False)
    assert plain.jobs[1].finished_s - 60 > 1800 and plain.preempted == 0
    saved = simulate(chosen, trace, hours=1.0, preemption=True)
    long, urgent = saved.jobs
    assert saved.preempted == 1 and long.preemptions == 1
    assert urgent.admitted_s == pytest.approx(90.0)
    assert urgent.finished_s == pytest.approx(90.0 + FINAL_S)
    assert long.gpu_s == pytest.approx(2 * FINAL_S)  # 2 GPUs x one render: nothing lost
    assert long.finished_s == pytest.approx(urgent.finished_s + 5 + FINAL_S - 2 * STEP_S,
                                            abs=5.0)
    assert summarise(saved)["deadline_missed"] == 0


def test_a_preempted_window_job_resumes_after_its_window_closed(tmp_path):
    """The long final is an overnight batch's, its window 00:00-00:01: it starts at 5 s,
    the window closes at 60 s, it yields at 85.5 s. Started, it is not waiting for its
    window: it resumes when the urgent one leaves (as the farm: issue #15 review), not at
    the next day's 00:00 (past the horizon: it would not have finished)."""
    long, urgent = urgent_final_trace()
    trace = [replace(long, batch="night", window="00:00-00:01"), urgent]
    result = simulate(scheduling_fleet(tmp_path), trace, hours=1.0, preemption=True)
    night, urgent = result.jobs
    assert result.preempted == 1 and night.state == "succeeded"
    assert night.finished_s == pytest.approx(urgent.finished_s + 5 + FINAL_S - 2 * STEP_S,
                                             abs=5.0)


def test_no_preemption_below_the_margin_or_past_max_preemptions(tmp_path):
    close = [TraceJob(at_s=0, prompt="near", track="final", frames=81, seed=1, priority=80),
             urgent_final_trace()[1]]  # 90 - 80 < margin 20: the final at 80 keeps its GPUs
    assert simulate(scheduling_fleet(tmp_path), close, hours=1.0).preempted == 0
    never = scheduling_fleet(tmp_path, "preemption: {max_preemptions: 0}\n")
    assert simulate(never, urgent_final_trace(), hours=1.0).preempted == 0


def test_batching_renders_like_drafts_together_and_meets_their_deadlines(tmp_path):
    """16 like drafts at 1 s on 4 A10s, due 1000 s later. Alone: rounds of 4 end at 285,
    565, 845 and 1125 s: 4 miss. In batches of 4: 4 batches at once on the 4 A10s, each
    280 x (1 + 3 x 0.25) = 490 s: all end at 495 s."""
    chosen = scheduling_fleet(tmp_path)
    alone = summarise(simulate(chosen, drafts_trace(), hours=1.0, batching=False))
    batched_result = simulate(chosen, drafts_trace(), hours=1.0, batching=True)
    batched = summarise(batched_result)
    assert (alone["deadline_missed"], alone["batched_jobs"]) == (4, 0)
    assert (batched["deadline_missed"], batched["batched_jobs"], batched["batch_runs"]) == \
        (0, 16, 4)
    assert [j.finished_s for j in batched_result.jobs] == [pytest.approx(5 + 490.0)] * 16
    assert batched["draft_waits"][1:3] == (4.0, 4.0)
    # GPU time: 4 batches x 490 s against 16 x 280 s alone.
    assert batched["tiers"]["a10"]["gpu_hours"] == pytest.approx(4 * 490 / 3600)


def test_the_four_runs_on_one_trace_come_out_as_worked_out(tmp_path):
    """The urgent final and the 16 drafts together (17 deadlines): neither 12 met,
    preemption 13 (the final), batching 16 (the drafts), both 17."""
    from scheduler.simulate.compare import RUNS, compare, format_comparison

    trace = sorted(urgent_final_trace() + drafts_trace(), key=lambda t: t.at_s)
    rows = compare(scheduling_fleet(tmp_path), trace, hours=1.0)
    assert [name for name, _ in rows] == [name for name, _, _ in RUNS]
    met = {name: s["deadline_jobs"] - s["deadline_missed"] for name, s in rows}
    assert met == {"neither": 12, "preemption": 13, "batching": 16, "both": 17}
    assert dict(rows)["both"]["deadline_hit_rate"] == 1.0
    table = format_comparison(rows)
    assert "13 of 17" in table and "100.0%" in table and table.count("\n") == 5
