"""Pure policy: model catalog, GPU tiers, routing, job -> segment planning. No I/O, no torch."""
