#!/usr/bin/env bash
# Fuzz smoke run, for CI: replays every kept regression, then runs each target for N seconds
# (first argument, default 20) from the seed corpus. Exits non-zero when anything crashes.
# FUZZ_TARGETS="a b" limits the run to those targets (default: all, from `cargo fuzz list`).
#
#   fuzz/smoke.sh          # 20 s per target
#   fuzz/smoke.sh 120      # 2 min per target
#
# Needs a nightly toolchain (FUZZ_TOOLCHAIN, default "nightly") and cargo-fuzz
# (cargo install cargo-fuzz --locked). New inputs go to a temporary directory, never into the
# seed corpus; crashing inputs are left in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-20}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
# Every target of Cargo.toml, or the ones named in FUZZ_TARGETS.
read -r -a targets <<<"${FUZZ_TARGETS:-$(cargo fuzz list | tr '\n' ' ')}"

cargo "+$toolchain" fuzz build >&2
host=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
bin_dir="target/$host/release"

failed=()

# 1. Every kept regression, one by one, so that each failure is named.
for target in "${targets[@]}"; do
    for input in regressions/"$target"/*; do
        [ -f "$input" ] || continue
        if ! "$bin_dir/$target" "$input" >"$input.log.tmp" 2>&1; then
            echo "smoke.sh: REGRESSION $target $input" >&2
            grep -m1 -A1 'panicked at' "$input.log.tmp" >&2 || tail -5 "$input.log.tmp" >&2
            failed+=("$target:$input")
        fi
        rm -f "$input.log.tmp"
    done
done

# 2. A short fuzz run per target from the seeds.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$work/$target"
    seeds=()
    [ -d "corpus/$target" ] && seeds=("corpus/$target")
    dict=()
    [ -f "dicts/$target.dict" ] && dict=("-dict=dicts/$target.dict")
    echo "smoke.sh: fuzzing $target for ${seconds}s" >&2
    if ! cargo "+$toolchain" fuzz run "$target" "$work/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 "${dict[@]}" \
        >"$work/$target.log" 2>&1; then
        echo "smoke.sh: CRASH in $target" >&2
        grep -m1 -A1 'panicked at' "$work/$target.log" >&2 || true
        grep 'Test unit written to' "$work/$target.log" >&2 || tail -20 "$work/$target.log" >&2
        failed+=("$target:fuzz")
    else
        grep -E '^stat::number_of_executed_units|^stat::average_exec_per_sec|DONE' \
            "$work/$target.log" >&2 || true
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "smoke.sh: FAILED: ${failed[*]}" >&2
    echo "smoke.sh: keep each new crash as fuzz/regressions/<target>/<name> (see README.md)" >&2
    exit 1
fi
echo "smoke.sh: ok" >&2
