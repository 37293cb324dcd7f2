#!/usr/bin/env bash
# Make sure headless Chromium is installed for the status-page browser test (tests/test_status_page.py).
#
# Idempotent: does nothing when /usr/bin/chromium already runs. Otherwise installs the Debian packages
# `chromium` and `chromium-driver` non-interactively (apt-get update first). Needs root (or sudo).
# Fails loudly, with the reason, never silently.
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

log() { echo "ensure-chromium: $*" >&2; }

works() { [ -x "$CHROMIUM" ] && "$CHROMIUM" --version 2>/dev/null | grep -q Chromium; }

if works; then
  exit 0
fi

command -v apt-get >/dev/null || {
  log "FAILED: $CHROMIUM is missing and apt-get is not available; install Chromium by hand"; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { log "FAILED: $CHROMIUM is missing and installing it needs root (no sudo)"; exit 1; }
  SUDO="sudo -n"
fi

export DEBIAN_FRONTEND=noninteractive
apt_log="$(mktemp -t ensure-chromium.XXXXXX.log)"
trap 'rm -f "$apt_log"' EXIT
fail() { tail -n 30 "$apt_log" >&2; log "FAILED: $*"; exit 1; }

log "installing chromium and chromium-driver with apt-get (first run only, ~1 min)"
$SUDO apt-get update -q >"$apt_log" 2>&1 || fail "apt-get update failed (network or apt sources; output above)"
# apt's own "Get:"/"Unpacking"/"Setting up" lines are the progress; the full output stays in the log.
set +e
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver 2>&1 | tee "$apt_log" \
  | grep --line-buffered -E '^(Get:|Unpacking|Setting up)' | sed -u 's/^/  /' >&2
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || fail "apt-get install chromium chromium-driver failed (output above)"

works || fail "installed chromium but $CHROMIUM --version does not run"
log "installed $("$CHROMIUM" --version 2>/dev/null)"
