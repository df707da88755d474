#!/usr/bin/env bash
# Install the systems that bench/compare.py measures unbroken against, outside the
# project's own .venv:
#   bench/.peers-venv  Python venv with dbos, absurd-sdk, absurdctl, restate-sdk, hypercorn
#                      and this project (-e .), so every adapter runs on one interpreter
#   bench/.node        the Restate server (npm package @restatedev/restate-server)
# Idempotent: a step whose result is already there is skipped. A peer that fails to
# install is recorded in bench/.peers-venv/peers-status.json and reported as skipped by
# compare.py; this script itself only fails when the venv cannot be created at all.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
VENV=bench/.peers-venv
NODE_DIR=bench/.node
STATUS=$VENV/peers-status.json
# httpx: the HTTP client the Restate adapter calls the ingress with (the SDK's own client uses it).
PEERS="dbos absurd-sdk absurdctl restate-sdk hypercorn httpx"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_peers: creating $VENV"
    "$PYTHON" -m venv "$VENV" || { echo "setup_peers: cannot create $VENV" >&2; exit 1; }
    "$VENV/bin/python" -m pip install --quiet --upgrade pip || true
fi

declare -A state
# The project itself, with its PostgreSQL extra.
if [ ! -f "$VENV/.project-installed" ] || [ pyproject.toml -nt "$VENV/.project-installed" ]; then
    echo "setup_peers: installing the project into $VENV"
    if "$VENV/bin/python" -m pip install --quiet -e ".[postgres]"; then
        touch "$VENV/.project-installed"
    else
        echo "setup_peers: installing the project failed" >&2
        exit 1
    fi
fi

# Each peer separately, so one failure does not hide the others.
for pkg in $PEERS; do
    if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        state[$pkg]="ok"
        continue
    fi
    echo "setup_peers: pip install $pkg"
    if out=$("$VENV/bin/python" -m pip install --quiet "$pkg" 2>&1); then
        state[$pkg]="ok"
    else
        echo "$out" | tail -5 >&2
        state[$pkg]="pip install $pkg failed: $(echo "$out" | tail -1 | tr -d '"\\' | cut -c1-200)"
    fi
done

# The Restate server binary, from npm, into bench/.node.
restate_bin() { ls "$NODE_DIR"/node_modules/@restatedev/restate-server-linux-*/bin/restate-server 2>/dev/null | head -1; }
if [ -z "$(restate_bin)" ]; then
    if command -v npm >/dev/null 2>&1; then
        echo "setup_peers: npm install @restatedev/restate-server"
        mkdir -p "$NODE_DIR"
        if out=$(npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error \
                @restatedev/restate-server 2>&1) && [ -n "$(restate_bin)" ]; then
            state[restate-server]="ok"
        else
            echo "$out" | tail -5 >&2
            state[restate-server]="npm install @restatedev/restate-server failed: $(echo "$out" | tail -1 | tr -d '"\\' | cut -c1-200)"
        fi
    else
        state[restate-server]="npm not found"
    fi
else
    state[restate-server]="ok"
fi

{
    echo "{"
    sep=""
    for key in "${!state[@]}"; do
        printf '%s  "%s": "%s"' "$sep" "$key" "${state[$key]}"
        sep=$',\n'
    done
    printf '\n}\n'
} > "$STATUS"
echo "setup_peers: done ($STATUS)"
cat "$STATUS"
