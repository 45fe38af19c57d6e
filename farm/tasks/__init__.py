"""What Celery runs: render a segment (`segment_runner`), stitch a job (`stitcher`), re-send
lost work (`reconcile`), and what a failure leads to (`failure_handling`, `failure_policy`).
The task definitions are in `celery_tasks`."""
