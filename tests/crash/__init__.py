"""Crash tests: real worker processes killed with SIGKILL and resumed (SPEC §9)."""
