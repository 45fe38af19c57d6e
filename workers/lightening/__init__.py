"""Lightening: turn a Wan checkpoint into lighter variants the router can target (issue #12).

`farm models derive BASE OUT [operations]` (farm/cli/models_cmds.py) runs `derive.derive`:
the base folder is copied to OUT, each operation rewrites OUT in place, and a `derive.json`
manifest (manifest.py) records the base, each operation's settings and training, and the
measured figures. Operations live one per file: quantize.py, prune.py, distill.py,
low_expert.py; step caching (step_cache.py) is applied at render time, per route.
"""
