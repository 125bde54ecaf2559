#!/usr/bin/env bash
# Wall, CPU and page-fault counts of a short ScatterNet CIFAR-10 training under
# glibc's malloc, under jemalloc (LD_PRELOAD) with its default decay, and under
# jemalloc keeping freed pages (MALLOC_CONF decay off), in turn, two rounds.
# Needs the CIFAR-10 features cached (DPJAX_CACHE_DIR) and libjemalloc2
# (Debian: apt-get install libjemalloc2). Run on an otherwise idle machine.
#   DPJAX_DATA_DIR=../shared/data DPJAX_CACHE_DIR=... bash scripts/benchmark_malloc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
jemalloc="${JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}"
keep='dirty_decay_ms:-1,muzzy_decay_ms:-1'
work="$(mktemp -d)"
args=(--config configs/scatternet_cifar10.py:cnn_tb --config.progress_bar=False
      --config.privacy.steps=12 --config.privacy.target_epsilon=None
      --config.privacy.noise_multiplier=2.5 --config.eval_size=2000)
for round in 1 2; do
  for v in glibc jemalloc jemalloc-keep; do
    pre="" conf=""
    if [ "$v" != glibc ]; then pre="$jemalloc"; fi
    if [ "$v" = jemalloc-keep ]; then conf="$keep"; fi
    /usr/bin/time -f "$v: wall %e s, user %U s, sys %S s, minor faults %R, max RSS %M KB" \
      env LD_PRELOAD="$pre" MALLOC_CONF="$conf" python -m dpjax.main "${args[@]}" \
      --workdir "$work/$v" 2>&1 | grep -E '^(glibc|jemalloc|jemalloc-keep):'
    rm -rf "${work:?}/$v"
  done
done
