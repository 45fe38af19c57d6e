"""`farm simulate`: a simulated day of a fleet for capacity planning (issue #14, item 4)."""

from __future__ import annotations

from pathlib import Path

import typer


def simulate(
    fleet: Path = typer.Option(None, help="fleet.yaml: GPUs per tier, prices, failure rates "
                               "(scheduler/config/fleet.example.yaml)"),
    workload: Path = typer.Option(None, help="trace.jsonl: one job a line, with `at`"),
    hours: float = typer.Option(24.0, help="hours of arrivals; the queue then drains"),
    seed: int = typer.Option(0, help="seed of the injected failures"),
    out: Path = typer.Option(Path("simulation"), help="folder for the PNG plots; with "
                             "--make-trace, the trace file to write"),
    rules: Path = typer.Option(None, help="rules file (wins over the fleet file's)"),
    tiers: Path = typer.Option(None, help="tiers file (wins over the fleet file's)"),
    make_trace: int = typer.Option(0, help="write a seeded trace of N jobs to --out and stop"),
    compare: bool = typer.Option(True, help="also run the trace without preemption, without "
                                 "batching and without both, and print the deadline hit "
                                 "rates and draft waits of the four (issue #15)"),
) -> None:
    """Simulate a day: queue waits per track and tier, GPU use, deadlines, overnight batches,
    cost per video, and plots of queue depth and utilisation. The day is the farm's
    scheduling (EDF within priority bands, preemption where a rule sets preempt_at,
    batching where a variant's max_batch > 1); --compare adds the four-run table."""
    from scheduler.simulate import workload as traces

    if make_trace:
        traces.write_trace(out, traces.make_trace(make_trace, seed=seed, hours=hours))
        typer.echo(f"wrote {make_trace} jobs to {out}")
        return
    for name, value in (("--fleet", fleet), ("--workload", workload)):
        if value is None:
            _fail(f"{name}: missing (or give --make-trace N --out trace.jsonl)")
    if hours <= 0:
        _fail(f"--hours: got {hours}: must be > 0")
    from scheduler.simulate.engine import simulate as run_day
    from scheduler.simulate.fleet import FleetError, PolicyFiles, load_fleet
    from scheduler.simulate.report import format_report, plot, summarise

    try:
        overrides = PolicyFiles(rules_file=str(rules.resolve()) if rules else None,
                                tiers_file=str(tiers.resolve()) if tiers else None)
        chosen = load_fleet(fleet, overrides)
        jobs = traces.load_trace(workload)
    except (FleetError, traces.TraceError) as exc:
        _fail(str(exc))
    result = run_day(chosen, jobs, hours=hours, seed=seed)
    typer.echo(format_report(summarise(result)))
    if compare:
        from scheduler.simulate.compare import compare as four_runs, format_comparison

        rows = four_runs(chosen, jobs, hours=hours, seed=seed, known={"both": result})
        typer.echo("\n" + format_comparison(rows))
    for path in plot(result, out):
        typer.echo(f"plot: {path}")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
