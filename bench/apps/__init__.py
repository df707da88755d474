"""The applications bench/workers.py runs: one module per system, each a queued workflow of
three steps with its worker and its enqueuer (run as scripts, one process per role)."""
