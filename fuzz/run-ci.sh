#!/usr/bin/env bash
# CI's fuzz smoke run (FUZZING.md): builds every target once, then runs each for a short time
# (FUZZ_SECONDS, default 15) over its committed corpus, one job on one core. Fails on any crash;
# skips visibly (exit 0) only when no nightly toolchain can be had.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-15}"
# The flags of the documented long runs, so both share one build. The build goes to a cache
# outside the checkout (CI runs in a fresh clone on the same machine): only this repository's
# crates are rebuilt there, not the instrumented dependencies (about 10 minutes on 2 cores).
target_dir="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/buildplane/fuzz-target}"
build_flags=(--sanitizer none --debug-assertions --target-dir "$target_dir")

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
    echo "fuzz: SKIPPED: no nightly toolchain and it could not be installed"
    exit 0
  fi
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

echo "fuzz: building all targets ($(rustup run nightly rustc --version))"
nice -n 19 cargo +nightly fuzz build "${build_flags[@]}"

mkdir -p artifacts
summary=()
failed=0
for target in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$target"
  log="artifacts/$target.log"
  # A scratch copy of the corpus: new inputs found here are not meant for the repository.
  scratch="$(mktemp -d)"
  cp -r "corpus/$target/." "$scratch/"
  status=0
  nice -n 19 cargo +nightly fuzz run "${build_flags[@]}" "$target" "$scratch" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  rm -rf "$scratch"
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  speed="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
  if [ "$status" -ne 0 ]; then
    failed=1
    summary+=("fuzz: $target: FAILED (exit $status) after ${runs:-?} executions; see fuzz/$log")
    tail -40 "$log"
  else
    summary+=("fuzz: $target: ok, ${runs:-?} executions in ${seconds}s, ${speed:-?} exec/s")
  fi
done
printf '%s\n' "${summary[@]}"
exit "$failed"
