#!/usr/bin/env bash
# Fuzzes EdgeGate's two decoders: the framed client codec
# (edgegate::framed::ClientCodec) and the link codec
# (edgegate_link::proto::FrameCodec).
#
# - Always: the property tests on stable (tests/tests/hostile.rs, module
#   `decoders`: arbitrary bytes in arbitrary pieces, length fields, single
#   byte mutations, round trips), 2,000 cases each; PROPTEST_CASES=N for more.
# - With a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`):
#   also each cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 60).
#   Not in CI: the project's machines have only the stable toolchain.
#
#   tests/hostile/fuzz.sh
#   FUZZ_SECONDS=600 tests/hostile/fuzz.sh
#
# Last line: "N passed, M failed".
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
passed=0
failed=0
result() {
    if [ "$2" -eq 0 ]; then echo "ok    $1"; passed=$((passed + 1)); else echo "FAIL  $1"; failed=$((failed + 1)); fi
}

log=$(mktemp)
cargo test -p edgegate-tests --test hostile decoders 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
p=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
f=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
passed=$((passed + p))
failed=$((failed + f))
if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then failed=$((failed + 1)); fi
rm -f "$log"

if rustup run nightly rustc --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    secs=${FUZZ_SECONDS:-60}
    for target in framed_client_codec link_frame_codec; do
        (cd fuzz && cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=1024 -max_len=70000)
        result "cargo fuzz run $target for ${secs}s" $?
    done
else
    echo "skip  cargo-fuzz targets (needs a nightly toolchain and cargo install cargo-fuzz)"
fi

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
