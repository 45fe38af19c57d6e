"""Fleet simulator (issue #14, item 4): a discrete-event day of the farm (SimPy) that runs
the farm's own routing (scheduler.routing.route), admission (scheduler.admission via
farm.jobs.admit's group arithmetic), quotas, windows, fallbacks and result-cache keys over
simulated GPUs, to size a fleet before buying it.

fleet.py reads fleet.yaml, workload.py reads and makes trace.jsonl, engine.py runs the day,
report.py prints the table and draws the plots. `farm simulate` is the command. Issue #15:
runs.py simulates the GPUs (batched renders, preemption at a step boundary), compare.py
runs a trace with and without preemption and batching and prints the deadline hit rates.
"""
