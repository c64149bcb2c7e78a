#!/usr/bin/env bash
# Provision the real Codex CLI (@openai/codex) the end-to-end test drives, from npm, pinned.
# Its npm package is a launcher; the native binary of this platform comes as an optional
# dependency (@openai/codex@<version>-linux-x64 and so on), so nothing else is downloaded.
#
# Installed once under $NEXUS_CLIENT_CACHE (default: ~/.cache/nexus-clients), one install at
# a time, and reused while the pinned version stays the same.
#
# Prints one line on stdout, the last thing it does:
#   CODEX=/abs/path/to/codex
# Everything else goes to stderr.
set -euo pipefail

CACHE="${NEXUS_CLIENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nexus-clients}"
CODEX_VERSION="0.171.0"
INSTALL_TIMEOUT=600 # seconds for npm install

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
command -v npm >/dev/null || { echo "npm is not installed (it comes with Node.js)" >&2; exit 1; }

DIR="$CACHE/codex-$CODEX_VERSION"
CODEX="$DIR/node_modules/.bin/codex"
exec 9>"$CACHE/.lock"
flock 9
if ! "$CODEX" --version 2>/dev/null | grep -qx "codex-cli $CODEX_VERSION"; then
	echo "installing @openai/codex@$CODEX_VERSION into $DIR" >&2
	rm -rf "$DIR"
	mkdir -p "$DIR"
	timeout "$INSTALL_TIMEOUT" npm install --prefix "$DIR" --no-save --no-audit --no-fund \
		--loglevel=error "@openai/codex@$CODEX_VERSION" >&2
	version="$("$CODEX" --version)"
	[[ "$version" == "codex-cli $CODEX_VERSION" ]] || {
		echo "codex --version says '$version', not $CODEX_VERSION" >&2
		exit 1
	}
fi
echo "CODEX=$CODEX"
