#!/usr/bin/env bash
# Build and run every fuzz target in fuzz/ (cargo-fuzz, libFuzzer) for a while each:
#
#   scripts/fuzz.sh                      # every target, FUZZ_SECONDS (default 5) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh request_head config_loader
#
# Seeds come from fuzz/corpus/<target>/ (committed, never written to); what a run discovers goes
# to a scratch corpus (FUZZ_WORK, default target/fuzz-corpus/<target>), kept between runs. A
# crash fails the script and leaves its input in fuzz/artifacts/<target>/; replay it with
# `cargo fuzz run <target> fuzz/artifacts/<target>/<file>` from the repository root.
#
# cargo-fuzz needs nightly compiler flags: on a stable toolchain they are unlocked with
# RUSTC_BOOTSTRAP=1. Installs cargo-fuzz if missing (about 2 minutes).
# Environment: FUZZ_SECONDS, FUZZ_TARGET_DIR (cargo's target dir, default fuzz/target),
# FUZZ_WORK, FUZZ_SANITIZER (address | none; default none: the crate forbids unsafe code).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-5}
sanitizer=${FUZZ_SANITIZER:-none}
target_dir=${FUZZ_TARGET_DIR:-fuzz/target}
work=${FUZZ_WORK:-target/fuzz-corpus}
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
case $work in /*) ;; *) work=$PWD/$work ;; esac

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== fuzz: building ${targets[*]} (sanitizer: $sanitizer)"
for t in "${targets[@]}"; do
    cargo fuzz build --sanitizer "$sanitizer" --target-dir "$target_dir" "$t"
done

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t"
    echo "== fuzz: $t for ${seconds}s"
    start=$(date +%s)
    # -timeout: one input taking longer than this is a finding too.
    log="$work/$t.log"
    # -timeout: one input taking longer than this is a finding too.
    if cargo fuzz run --sanitizer "$sanitizer" --target-dir "$target_dir" "$t" \
        "$work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "== fuzz: $t ok: ${runs:-?} inputs in $(( $(date +%s) - start ))s, corpus $(ls "$work/$t" | wc -l) files"
    else
        tail -n 40 "$log" >&2
        echo "== fuzz: $t FAILED (full log $log; input in fuzz/artifacts/$t/)" >&2
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== fuzz: failures in ${failed[*]}" >&2
    exit 1
fi
echo "== fuzz: all ${#targets[@]} targets ran ${seconds}s each without a finding"
