#!/usr/bin/env bash
# Final benches of session 7, idle machine, one after another. BIN holds lazysnap and bench_suite.
set -u
BIN=${BIN:-/work/bin-final7}
OUT=${OUT:-/work/main/results/2026-11-30-session7}
mkdir -p "$OUT"
rm -rf /tmp/bench-final && cp -al /tmp/bench/work /tmp/bench-final
run() { name=$1; shift; echo "== $name $(date +%T)"; LAZYSNAP_TEST_NAMESPACE=final timeout 2400 "$BIN/bench_suite" --lazysnap "$BIN/lazysnap" --work /tmp/bench-final --results "$OUT/$name.tmp" "$@" > "$OUT/$name.log" 2>&1; rc=$?; d=$(ls -d "$OUT/$name.tmp"/20* 2>/dev/null | head -1); [ -n "$d" ] && mv "$d" "$OUT/$name"; rm -rf "$OUT/$name.tmp"; echo "   rc=$rc $(date +%T)"; }
for s in ${SCENARIOS:-cold-trace warm-nopt warm-pt data-nopt data-pt}; do
  case $s in
    cold-trace) run cold-trace --images python,tools --formats esgz,esgz-opt,zstd,gzip-index --scenarios cold,trace --runs 5 ;;
    warm-nopt) run warm-nopt --images python --formats gzip,esgz,zstd --scenarios normal,warm --runs 5 --lazysnap-config /tmp/bench/nopt.toml ;;
    warm-pt) run warm-pt --images python --formats gzip,esgz,zstd --scenarios normal,warm --runs 5 --lazysnap-config /tmp/bench/pt.toml ;;
    data-nopt) run data-nopt --images data --formats gzip,esgz,zstd --scenarios normal,cold --runs 3 --data-mib 512 --lazysnap-config /tmp/bench/nopt.toml ;;
    data-pt) run data-pt --images data --formats gzip,esgz,zstd --scenarios normal,cold --runs 3 --data-mib 512 --lazysnap-config /tmp/bench/pt.toml ;;
  esac
done
