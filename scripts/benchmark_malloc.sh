#!/usr/bin/env bash
# Wall, CPU and page-fault counts of a short ScatterNet CIFAR-10 training under
# glibc's malloc and under jemalloc (LD_PRELOAD), alternating, two pairs.
# Needs the CIFAR-10 features cached (DPJAX_CACHE_DIR) and libjemalloc2
# (Debian: apt-get install libjemalloc2). Run on an otherwise idle machine.
#   DPJAX_DATA_DIR=../shared/data DPJAX_CACHE_DIR=... bash scripts/benchmark_malloc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
jemalloc="${JEMALLOC:-/usr/lib/x86_64-linux-gnu/libjemalloc.so.2}"
work="$(mktemp -d)"
args=(--config configs/scatternet_cifar10.py:cnn_tb --config.progress_bar=False
      --config.privacy.steps=12 --config.privacy.target_epsilon=None
      --config.privacy.noise_multiplier=2.5 --config.eval_size=2000)
for v in glibc jemalloc glibc jemalloc; do
  pre=""
  if [ "$v" = jemalloc ]; then pre="$jemalloc"; fi
  /usr/bin/time -f "$v: wall %e s, user %U s, sys %S s, minor faults %R" \
    env LD_PRELOAD="$pre" python -m dpjax.main "${args[@]}" \
    --workdir "$work/$v" 2>&1 | grep -E '^(glibc|jemalloc):'
  rm -rf "${work:?}/$v"
done
