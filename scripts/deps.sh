#!/usr/bin/env bash
# Installs the Debian packages listed in scripts/packages.txt that are missing.
# Idempotent and quiet when everything is present. Installing needs root
# (apt-get); fails, naming them, when packages are missing and cannot be
# installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
mapfile -t pkgs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$here/packages.txt" | grep -v '^$')
# PACKAGE:COMMAND is present when dpkg has PACKAGE or COMMAND is on PATH.
missing_pkgs() {
	local p cmd
	for p in "${pkgs[@]}"; do
		cmd="${p#*:}"
		[[ $cmd != "$p" ]] && command -v "$cmd" >/dev/null && continue
		p="${p%%:*}"
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
	done
}
if ! command -v dpkg-query >/dev/null; then
	echo "deps: dpkg-query not found: the tests need a Debian machine (scripts/packages.txt names Debian packages)" >&2
	exit 1
fi
mapfile -t missing < <(missing_pkgs)
if ((${#missing[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: missing packages: ${missing[*]}; run as root to install them (apt-get install ${missing[*]})" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	log="$(mktemp)"
	if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
		tail -n 20 "$log" >&2
	fi
	rm -f "$log"
	mapfile -t missing < <(missing_pkgs)
	if ((${#missing[@]})); then
		echo "deps: could not install: ${missing[*]} (apt-get output above)" >&2
		exit 1
	fi
fi
# The VM test asks apt which kernel to fetch; images often ship without package lists.
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
	if [[ $(id -u) -eq 0 ]]; then
		apt-get update -qq || { echo "deps: apt-get update failed: the VM test needs apt's package lists" >&2; exit 1; }
	else
		echo "deps: warning: apt has no package lists (run apt-get update as root): the VM test will fail in strict mode" >&2
	fi
fi
# integration/mcp drives `ferry mcp` through the TypeScript MCP SDK, pinned
# by its lock file; npm ci runs again only when the lock file changed.
tsclient="$here/../integration/mcp/testdata/tsclient"
stamp="$tsclient/node_modules/.ferry-lock.sha256"
want="$(sha256sum "$tsclient/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
	echo "deps: npm ci in integration/mcp/testdata/tsclient"
	if ! (cd "$tsclient" && npm ci --no-audit --no-fund --loglevel=error); then
		echo "deps: npm ci failed in $tsclient: the TypeScript MCP client test (integration/mcp) needs it" >&2
		exit 1
	fi
	echo "$want" >"$stamp"
fi
# FUSE needs its device node; loop devices need the module on some hosts.
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || true
modprobe loop 2>/dev/null || true
# The tests name these too (and fail in strict mode); saying it here first
# saves a long run.
for dev in /dev/fuse /dev/loop-control; do
	[[ -e $dev ]] || echo "deps: warning: $dev is missing (modprobe fuse loop; in a container, pass the device): the tests that need it will fail in strict mode" >&2
done
