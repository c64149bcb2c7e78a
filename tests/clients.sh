#!/usr/bin/env bash
# Provision the real coding-agent CLIs the end-to-end tests drive, from npm, pinned:
# Claude Code (@anthropic-ai/claude-code). Its npm package is a thin wrapper whose postinstall
# puts the native binary of this platform (an optional dependency) in place of bin/claude.exe.
#
# Installed once under $NEXUS_CLIENT_CACHE (default: ~/.cache/nexus-clients), one install at
# a time, and reused while the pinned version stays the same.
#
# Prints one line on stdout, the last thing it does:
#   CLAUDE=/abs/path/to/claude
# Everything else goes to stderr.
set -euo pipefail

CACHE="${NEXUS_CLIENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nexus-clients}"
CLAUDE_CODE_VERSION="2.1.332"
INSTALL_TIMEOUT=600 # seconds for npm install

mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
command -v npm >/dev/null || { echo "npm is not installed (it comes with Node.js)" >&2; exit 1; }

DIR="$CACHE/claude-code-$CLAUDE_CODE_VERSION"
CLAUDE="$DIR/node_modules/.bin/claude"
exec 9>"$CACHE/.lock"
flock 9
if ! "$CLAUDE" --version 2>/dev/null | grep -q "^$CLAUDE_CODE_VERSION "; then
	echo "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $DIR" >&2
	rm -rf "$DIR"
	mkdir -p "$DIR"
	timeout "$INSTALL_TIMEOUT" npm install --prefix "$DIR" --no-save --no-audit --no-fund \
		--loglevel=error "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2
	version="$("$CLAUDE" --version)"
	[[ "$version" == "$CLAUDE_CODE_VERSION "* ]] || {
		echo "claude --version says '$version', not $CLAUDE_CODE_VERSION" >&2
		exit 1
	}
fi
echo "CLAUDE=$CLAUDE"
