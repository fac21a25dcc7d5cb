# The Hamilton UI server for the tracking end-to-end test (tests/test_hamilton_ui.py), sourced
# by .ci/run. apache-hamilton-ui lives in its own virtual environment (its Django and ddtrace stay
# out of the project's lock), kept between runs; the server runs in the background with its
# default SQLite store in a fresh temporary directory, on a free port, until stop_hamilton_ui.
# start_hamilton_ui exports its address in FINETUNE_TEST_HAMILTON_UI_URL; the test skips, saying
# why, when the variable is unset. It needs nothing from the internet but PyPI.

HAMILTON_UI_VERSION=0.0.18
HAMILTON_UI_VENV=.ci/hamilton-ui-venv
hamilton_ui_pid=
hamilton_ui_dir=

# the venv with apache-hamilton-ui==$HAMILTON_UI_VERSION, made or kept (idempotent)
install_hamilton_ui() {
    local python="$HAMILTON_UI_VENV/bin/python" installed
    installed=$("$python" -c 'from importlib import metadata; print(metadata.version("apache-hamilton-ui"))' 2>/dev/null || true)
    if [ "$installed" = "$HAMILTON_UI_VERSION" ]; then
        return 0
    fi
    local log
    log=$(mktemp)
    if ! { python3 -m venv "$HAMILTON_UI_VENV" &&
        "$python" -m pip install -q "apache-hamilton-ui==$HAMILTON_UI_VERSION"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

# starts the server and waits (2 minutes at most) until its API answers: about 5 s here
start_hamilton_ui() {
    install_hamilton_ui || return 1
    local port url
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    url="http://127.0.0.1:$port"
    hamilton_ui_dir=$(mktemp -d)
    # its own session: stopping it ends Django's autoreloader and the server it runs alike
    HAMILTON_TELEMETRY_ENABLED=false setsid "$HAMILTON_UI_VENV/bin/hamilton" ui --no-open \
        --port "$port" --base-dir "$hamilton_ui_dir/db" >"$hamilton_ui_dir/server.log" 2>&1 &
    hamilton_ui_pid=$!
    local probe='import sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/api/v1/phone_home", headers={"x-api-user": "ci"})
urllib.request.urlopen(request, timeout=5).read()'
    local tries=240
    until python3 -c "$probe" "$url" 2>/dev/null; do
        tries=$((tries - 1))
        if [ "$tries" -le 0 ] || ! kill -0 "$hamilton_ui_pid" 2>/dev/null; then
            tail -n 20 "$hamilton_ui_dir/server.log" >&2
            stop_hamilton_ui
            return 1
        fi
        sleep 0.5
    done
    export FINETUNE_TEST_HAMILTON_UI_URL="$url"
}

# stops the server (if this shell started it) and removes its store
stop_hamilton_ui() {
    if [ -n "$hamilton_ui_pid" ]; then
        kill -- "-$hamilton_ui_pid" 2>/dev/null || true
        wait "$hamilton_ui_pid" 2>/dev/null || true
        hamilton_ui_pid=
    fi
    if [ -n "$hamilton_ui_dir" ]; then
        rm -rf "$hamilton_ui_dir"
        hamilton_ui_dir=
    fi
    unset FINETUNE_TEST_HAMILTON_UI_URL
}
