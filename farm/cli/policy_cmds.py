"""`farm rules` (check a rules file, explain a job's route) and `farm batch` (submit, status)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from farm.cli.client import check, client

rules_app = typer.Typer(help="Routing rules: check a file, explain a job's route.")
batch_app = typer.Typer(help="Batches: many prompts from a JSONL or CSV file, now or in a window.")

_TIERS = typer.Option(None, help="tiers YAML; default FARM_TIERS_FILE or the shipped one")
_MODELS = typer.Option(None, help="models YAML; default FARM_MODELS_FILE or the shipped one")


def _load(rules: Path | None, tiers: Path | None, models: Path | None):
    from farm.policy import load_policy
    from farm.settings import get_settings
    from scheduler.catalog import PolicyError

    s = get_settings()
    try:
        return load_policy(tiers or s.tiers_file, models or s.models_file, rules or s.rules_file,
                           s.variants_file)
    except (PolicyError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _json_arg(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        typer.echo(f"error: {where}: not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    if not isinstance(value, dict):
        typer.echo(f"error: {where}: expected a JSON object, got {value!r}", err=True)
        raise typer.Exit(2)
    return value


@rules_app.command("check")
def rules_check(file: Path, tiers: Path = _TIERS, models: Path = _MODELS) -> None:
    """Validate FILE against the tiers and models; list every problem, by rule. Then each
    route's plan and memory per GPU, and whether each variant it reaches is on this machine
    (or how to make it). A variant with no folder that nothing makes is a problem too."""
    from farm.settings import get_settings

    policy = _load(file, tiers, models)
    typer.echo(f"{file}: {len(policy.rules.rules)} rules OK (sha256 {policy.rules.sha256[:12]})")
    for rule in policy.rules.rules:
        typer.echo(f"  {rule.name}: {_choice_line(policy.catalog, rule, rule.route)}")
        for i, fallback in enumerate(rule.fallbacks):
            typer.echo(f"    fallback {i}: {_choice_line(policy.catalog, rule, fallback.route)}")
    problems = _model_problems(get_settings(), policy)
    if problems:
        for problem in problems:
            typer.echo(f"error: {file}: {problem}", err=True)
        raise typer.Exit(1)


def _choice_line(catalog, rule, choice) -> str:
    """Each variant the choice renders, its tracks' light variants too (issue #12), with
    its plan and memory per GPU from its own bytes per parameter."""
    from scheduler.memory import NoFittingPlan, choose_plan
    from scheduler.routing import track_variant

    names = [choice.variant] if choice.variant else list(rule.match.model)
    tier = catalog.tiers[choice.tier]
    parts = []
    for name in names:
        for track, light in catalog.models[name].tracks.items():
            if track_variant(catalog, name, track, choice.placement) is None:
                parts.append(f"{name} {track} track: {light} is quantized, which the "
                             f"offload placement cannot hold: {name} renders it")
        for label, variant in [(name, name)] + [
                (f"{name} {track} track: {light}", light)
                for track, light in catalog.models[name].tracks.items()
                if track_variant(catalog, name, track, choice.placement) is not None]:
            try:
                plan, need = choose_plan(catalog, catalog.models[variant], tier, choice.degree,
                                         choice.placement, choice.parallel)
            except NoFittingPlan as exc:  # routing keeps the base for that track
                parts.append(f"{label} does not fit {choice.tier} ({exc}): {name} renders it")
                continue
            parts.append(f"{label} on {choice.tier} x{choice.degree}, {plan.name} "
                         f"({choice.placement}): {need.total_gb:.1f} of {tier.memory_gb:g} GB "
                         "per GPU")
    return "; ".join(parts)


def _model_problems(settings, policy) -> list[str]:
    """Print each routed variant's folder; return the rules that reach one nothing makes."""
    from farm.model_dirs import availability

    reached: dict[str, list[str]] = {}
    for rule in policy.rules.rules:
        choices = [("route", rule.route)] + [(f"fallbacks[{i}]", f.route)
                                             for i, f in enumerate(rule.fallbacks)]
        for where, choice in choices:
            for name in [choice.variant] if choice.variant else rule.match.model:
                reached.setdefault(name, []).append(f"rule {rule.name!r}: {where}")
                for track, light in policy.catalog.models[name].tracks.items():
                    reached.setdefault(light, []).append(
                        f"rule {rule.name!r}: {where}, {name}'s {track} track")
    typer.echo("models the rules reach:")
    problems = []
    for name, wheres in reached.items():
        found = availability(settings, policy.catalog.models[name])
        if found.present:
            typer.echo(f"  {name}: present at {found.path}")
        elif found.how:
            typer.echo(f"  {name}: missing at {found.path}: {found.how}")
        else:
            typer.echo(f"  {name}: missing at {found.path}, and nothing makes it")
            problems += [f"{w}: variant {name!r} has no folder at {found.path} and nothing "
                         "makes one: put its diffusers folder there, or route elsewhere"
                         for w in wheres]
    return problems


@rules_app.command("explain")
def rules_explain(job_file: Path = typer.Argument(..., metavar="JOB.json"),
                  rules: Path = typer.Option(None, help="default FARM_RULES_FILE or shipped"),
                  tiers: Path = _TIERS, models: Path = _MODELS,
                  queue: list[str] = typer.Option([], help="QUEUE=WAITING_JOBS, e.g. "
                                                         "render.a100=12 (what-if)"),
                  running: list[str] = typer.Option(
                      [], help="JOB:PRIORITY:GPUS[:PREEMPTIONS[:batch]], a segment running on "
                               "the route's tier (what-if; the rest of the tier is free)"),
                  live: bool = typer.Option(False, help="who would be preempted on the live "
                                                        "farm (FARM_DATABASE_URL) now")) -> None:
    """Which rule JOB.json (the body of a job submission) hits, which did not and why, and
    the memory arithmetic of its route; with --running or --live, who it would preempt
    (issue #15) and why the others would not yield."""
    from pydantic import ValidationError

    from farm.jobs.submit import job_spec
    from scheduler.routing import QueueLoad, explain

    policy = _load(rules, tiers, models)
    from farm.schemas import JobCreate

    data = _json_arg(job_file.read_text(), str(job_file))
    batch = bool(data.pop("batch", False))
    try:
        request = JobCreate(**{"prompt": "explain", **data})
    except ValidationError as exc:
        for err in exc.errors():
            typer.echo(f"error: {'.'.join(map(str, err['loc']))}: {err['msg']} "
                       f"(got {err.get('input')!r})", err=True)
        raise typer.Exit(2) from None
    loads = {}
    for item in queue:
        name, _, count = item.partition("=")
        if not name or not count.isdigit():
            typer.echo(f"error: --queue: got {item!r}; expected QUEUE=WAITING_JOBS, "
                       "e.g. render.a100=12", err=True)
            raise typer.Exit(2)
        loads[name] = QueueLoad(waiting_jobs=int(count))
    result = explain(job_spec(request, batch), policy.rules, policy.catalog, loads)
    for v in result.verdicts:
        mark = "MATCH" if v["matches"] else "no   "
        typer.echo(f"{mark} {v['rule']:<28} [{v['match']}] {v.get('why_not', '')}")
        for spill in v.get("spills", []):
            typer.echo(f"      fallback {spill['fallback']}: "
                       + (f"taken: {spill['because']}" if spill["taken"] else "not needed"))
    if result.error:
        typer.echo(f"error: {result.error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"route: {json.dumps(result.route)}")
    typer.echo(f"memory: {result.memory}")
    typer.echo(f"rules sha256: {result.rules_sha256}")
    if running or live:
        _explain_preemption(result.route, request.priority, policy, running, live)


def _running_option(item: str):
    """--running JOB:PRIORITY:GPUS[:PREEMPTIONS[:batch]] -> (Running, in a batch)."""
    from scheduler.preemption import Running

    parts = item.split(":")
    batched = parts[-1] == "batch" and len(parts) == 5
    numbers = parts[1:4] if batched else parts[1:]
    if not 3 <= len(parts) <= 5 or not parts[0] or not all(n.isdigit() for n in numbers) \
            or (len(parts) == 5 and not batched):
        typer.echo(f"error: --running: got {item!r}; expected JOB:PRIORITY:GPUS[:PREEMPTIONS"
                   "[:batch]], e.g. overnight-7:10:2:1", err=True)
        raise typer.Exit(2)
    priority, gpus = int(parts[1]), int(parts[2])
    preemptions = int(parts[3]) if len(parts) >= 4 else 0
    return Running(-1, parts[0], priority, gpus, preemptions, 0.0), batched


def _explain_preemption(route: dict, priority: int, policy, running: list[str], live: bool):
    """Who the job would preempt on its tier (scheduler.preemption.choose_victims), and
    why each other running segment would not yield (issue #15)."""
    from farm.jobs.admit import gpus_per_group
    from farm.settings import get_settings
    from scheduler.preemption import choose_victims, qualifies, why_not_eligible

    settings, tier = get_settings(), route["tier"]
    at, margin = route.get("preempt_at"), route.get("preempt_margin", 20)
    need, spec = gpus_per_group(route), policy.catalog.tiers[tier]
    if live:
        from farm.jobs.preempt import live_view

        try:
            segs, batched, free = live_view(settings.database_url, tier, policy)
        except Exception as exc:  # the farm's database is not reachable from here
            typer.echo(f"error: --live: cannot read {tier}'s running segments: {exc}", err=True)
            raise typer.Exit(1) from None
        source = "live farm"
    else:
        given = [_running_option(item) for item in running]
        segs = [r for r, b in given if not b]
        batched = [r.job_id for r, b in given if b]
        # ids for the what-if segments: their order on the command line
        segs = [type(r)(i, r.job_id, r.priority, r.gpus, r.preemptions, float(i))
                for i, r in enumerate(segs, 1)]
        held = sum(r.gpus for r, _ in given)
        free, source = max(0, spec.count * spec.gpus_per_node - held), "what-if"
    typer.echo(f"preemption on {tier} ({source}): preempt_at {at}, preempt_margin {margin}, "
               f"FARM_MAX_PREEMPTIONS {settings.max_preemptions}; the job (priority "
               f"{priority}) needs {need} GPU(s), {free} free")
    if not qualifies(priority, at):
        typer.echo("  nobody: " + ("its route never preempts (no preempt_at)" if at is None
                                   else f"priority {priority} is below preempt_at {at}"))
    chosen = choose_victims(priority, need, free, segs, at, margin, settings.max_preemptions) \
        if qualifies(priority, at) else []
    for seg in chosen:
        typer.echo(f"  would yield: {seg.job_id} (priority {seg.priority}, {seg.gpus} GPU(s), "
                   f"yielded {seg.preemptions} time(s))")
    if qualifies(priority, at) and not chosen:
        typer.echo("  nobody: " + ("the tier has room" if free >= need else
                                   "no set of eligible segments frees enough"))
    for seg in segs:
        if seg not in chosen:
            why = (why_not_eligible(seg, priority, margin, settings.max_preemptions)
                   if qualifies(priority, at) else "the job does not preempt")
            typer.echo(f"  stays: {seg.job_id} (priority {seg.priority}): "
                       f"{why or 'not needed: the ones above free enough'}")
    for job_id in batched:
        typer.echo(f"  stays: {job_id}: renders in a batch (batch members are never preempted)")


@batch_app.command("submit")
def batch_submit(file: Path,
                 window: str = typer.Option(None, help='e.g. "22:00-06:00": wait for it'),
                 timezone: str = typer.Option("UTC", "--tz", help="IANA name for the window"),
                 on_close: str = typer.Option("wait", help="wait | cancel: unsent jobs when "
                                                           "the window closes"),
                 project: str = "default", name: str = "",
                 defaults: str = typer.Option("{}", help="JSON job fields for every line")) -> None:
    """Submit FILE (.jsonl or .csv: a prompt per line, with overrides and `seeds` fan-out)."""
    fmt = "csv" if file.suffix.lower() == ".csv" else "jsonl"
    body = dict(content=file.read_text(encoding="utf-8"), format=fmt, window=window,
                timezone=timezone, on_window_close=on_close, project=project,
                name=name or file.stem, defaults=_json_arg(defaults, "--defaults"))
    with client() as http:
        batch = check(http.post("/v1/batches", json=body))
    typer.echo(f"batch {batch['id']}: {batch['jobs']} jobs")


@batch_app.command("status")
def batch_status(batch_id: str) -> None:
    """A batch's jobs counted by state, its window and its report."""
    with client() as http:
        typer.echo(json.dumps(check(http.get(f"/v1/batches/{batch_id}")), indent=2))


@batch_app.command("wait")
def batch_wait(batch_id: str, timeout: float = typer.Option(86400.0, help="seconds")) -> None:
    """Follow a batch (the API's event stream) with a bar of its jobs ended until it is
    done; exit 1 unless every job succeeded."""
    import time

    import httpx

    from farm.cli import watch

    deadline = time.monotonic() + timeout
    with client() as http:
        result, last = watch.wait_batch(http, batch_id, deadline)
        if isinstance(result, httpx.Response):
            check(result)  # 403, 404: says why, exit 1
        while result is watch.NO_STREAM and time.monotonic() <= deadline:  # an older API
            batch = check(http.get(f"/v1/batches/{batch_id}"))
            last, result = batch, (True if batch["state"] == "done" else watch.NO_STREAM)
            time.sleep(0 if result is True else 1.0)
    counts = last.get("counts", {})
    summary = ", ".join(f"{state} {n}" for state, n in sorted(counts.items()))
    if result is not True or set(counts) != {"succeeded"}:
        typer.echo(f"batch {batch_id} {'done' if result is True else 'not done'}: {summary}",
                   err=True)
        raise typer.Exit(1)
    typer.echo(f"batch {batch_id} done: {summary}")
