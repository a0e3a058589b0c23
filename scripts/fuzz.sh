#!/usr/bin/env bash
# Runs every fuzz target in the module for FUZZTIME each (default 30s), one at
# a time (each uses every core). A crasher stays in the package's
# testdata/fuzz/FuzzX/ (go test writes it there), where plain `go test`
# replays it from then on; commit it with the fix. Fails if any fuzzer found
# a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${FUZZTIME:-30s}"
go="${GO:-go}"
mapfile -t targets < <(grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r f; do
	for fn in $(sed -n 's/^func \(Fuzz[A-Za-z0-9_]*\)(.*/\1/p' "$f"); do
		echo "./$(dirname "${f#./}") $fn"
	done
done)
if ((${#targets[@]} == 0)); then
	echo "fuzz: no fuzz targets found" >&2
	exit 1
fi
failed=()
for t in "${targets[@]}"; do
	read -r pkg fn <<<"$t"
	echo "== fuzz $pkg $fn for $fuzztime"
	if ! "$go" test -run '^$' -fuzz "^${fn}\$" -fuzztime "$fuzztime" "$pkg"; then
		failed+=("$pkg $fn")
	fi
done
echo "fuzz: ran ${#targets[@]} targets for $fuzztime each"
if ((${#failed[@]})); then
	printf 'fuzz: FAILED %s (the crasher is under its package testdata/fuzz/)\n' "${failed[@]}" >&2
	exit 1
fi
