#!/usr/bin/env bash
# Runs wechatpy_peer.py with wechatpy (pinned) from a virtualenv of its own, made on
# first use and reused (the same pattern as scripts/schemathesis.sh). Fails loudly
# when Python or wechatpy cannot be installed: the peer test never skips.
#
#   WECHATPY_VENV: where wechatpy is installed (default under /tmp, reused).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WECHATPY_VERSION=1.8.18
CRYPTOGRAPHY_VERSION=50.0.2
VENV=${WECHATPY_VENV:-${TMPDIR:-/tmp}/formid-ledger-wechatpy-$WECHATPY_VERSION}

ready() {
    "$VENV/bin/python" -c "import wechatpy, cryptography; assert wechatpy.__version__ == '$WECHATPY_VERSION'" 2>/dev/null
}

# The tests run in parallel: on a fresh machine several find no venv at once (stop
# 19's CI: two venvs made over each other, pip missing). One installs under a lock;
# the others wait for it, then find the venv ready. A venv is only ever ready once
# its install finished, so a reader that finds it ready needs no lock.
if ! ready; then
    exec 9> "$VENV.lock"
    flock 9
    if ! ready; then
        echo "wechatpy_peer.sh: installing wechatpy $WECHATPY_VERSION into $VENV" >&2
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check \
            "wechatpy==$WECHATPY_VERSION" "cryptography==$CRYPTOGRAPHY_VERSION" >&2
    fi
    exec 9>&-
fi
exec "$VENV/bin/python" "$HERE/wechatpy_peer.py" "$@"
