"""The job service and what feeds it: state changes by compare-and-set (`service`),
submission, release to the GPUs, dispatch by task name, batches, events, keys, reports.
Nothing here imports `farm.tasks`: work is sent to Celery by task name."""
