"""Serve restate_app with hypercorn in this one process (hypercorn's documented
``hypercorn.asyncio.serve`` entry point), so a crash of the app is a crash of the process.

Usage (from bench/): python -m peers.restate_serve PORT
"""

from __future__ import annotations

import asyncio
import sys

import hypercorn
import hypercorn.asyncio

from peers.restate_app import app


def main() -> None:
    conf = hypercorn.Config()
    conf.bind = [f"127.0.0.1:{int(sys.argv[1])}"]
    # The serving settings the Restate documentation gives for hypercorn.
    conf.h2_max_concurrent_streams = 2147483647
    conf.keep_alive_max_requests = 2147483647
    conf.keep_alive_timeout = 2147483647
    asyncio.run(hypercorn.asyncio.serve(app, conf))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
