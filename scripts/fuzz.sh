#!/usr/bin/env bash
# Run the cargo-fuzz targets of fuzz/ for a bounded time each.
#
#   scripts/fuzz.sh                          # every target, 60 s each
#   FUZZ_SECONDS=600 scripts/fuzz.sh config  # one target, 10 minutes
#
# Targets (fuzz/fuzz_targets/):
#   credential_value  ledger::is_valid_value never panics and agrees with the rule
#                     "1..=128 bytes, each 0x21..=0x7E"
#   session_token     SessionKey::verify never panics, never accepts a token sign()
#                     did not make; sign → verify round-trips
#   config            Settings::from_sources(TOML text, env) never panics; every
#                     error names a LEDGER_ setting and repeats no secret
#
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer=address,
# -Cpasses=sancov-module, …). Only the stable toolchain is installed here and no
# nightly can be fetched, so this script sets RUSTC_BOOTSTRAP=1, which makes stable
# rustc accept them. (With a nightly toolchain: `cargo +nightly fuzz run …` works
# without it.)
#
# Knobs: FUZZ_SECONDS (per target, default 60), FUZZ_SANITIZER (address, the default,
# or none: faster, for code without unsafe), FUZZ_DEBUG_ASSERTIONS=1 (build with
# debug assertions and overflow checks; a separate, full rebuild), FUZZ_JOBS (libFuzzer
# worker processes per target, default 1). The corpus grows in fuzz/corpus/<target>;
# a crash is saved in fuzz/artifacts/<target>/ and the script exits non-zero after
# printing how to reproduce it (`cargo fuzz run <target> <file>`) and the input.
# Everything under fuzz/ that runs produce (target, corpus, artifacts) is git-ignored.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_DIR="$ROOT/fuzz"
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-address}
JOBS=${FUZZ_JOBS:-1}
ALL_TARGETS=(credential_value session_token config)
if [[ $# -gt 0 ]]; then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

export RUSTC_BOOTSTRAP=1
# The fuzz crate has its own target dir (fuzz/target), whatever the caller's is.
unset CARGO_TARGET_DIR

log() { printf '==> %s\n' "$*" >&2; }

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (crates.io)"
    cargo install --locked cargo-fuzz
fi

BUILD_FLAGS=(--release --sanitizer "$SANITIZER")
[[ -n "${FUZZ_DEBUG_ASSERTIONS:-}" ]] && BUILD_FLAGS+=(--debug-assertions)

cd "$FUZZ_DIR"
log "building the fuzz targets (${BUILD_FLAGS[*]})"
cargo fuzz build "${BUILD_FLAGS[@]}"

FAILED=()
SUMMARY=()
for target in "${TARGETS[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    args=(-max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1)
    [[ -f "dict/$target.dict" ]] && args+=(-dict="dict/$target.dict")
    if [[ "$JOBS" -gt 1 ]]; then args+=(-jobs="$JOBS" -workers="$JOBS"); fi
    log "fuzzing $target for ${SECONDS_PER_TARGET}s"
    out="artifacts/$target/last-run.log"
    rc=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$target" "corpus/$target" -- "${args[@]}" 2>&1 |
        tee "$out" | grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|==|stat::|thread .* panicked|Failing input|SUMMARY|Output of)' || true
    rc=${PIPESTATUS[0]}
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -1)
    SUMMARY+=("$target: ${execs:-?} execs in ${SECONDS_PER_TARGET}s, corpus $(find "corpus/$target" -type f | wc -l) inputs, exit $rc")
    if [[ $rc -ne 0 ]]; then
        FAILED+=("$target")
        echo "---- $target failed; its log: fuzz/$out" >&2
        grep -E -A30 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer' "$out" | head -60 >&2 || true
    fi
done

echo
printf '%s\n' "${SUMMARY[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "FAILED: ${FAILED[*]} (crash inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzz: no crash"
