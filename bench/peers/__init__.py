"""One adapter per measured system; each runs in its own process via bench/run_one.py."""
