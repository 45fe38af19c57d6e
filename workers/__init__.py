"""GPU side: Ray actors, model runtime, parallelism, video encode/stitch/probe."""
