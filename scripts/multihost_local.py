"""Runs dpjax-train as N processes on this machine: a multi-host rehearsal.

Each process plays one host: it joins the others through
``jax.distributed.initialize`` (coordinator on localhost, CPU collectives over
gloo), sees one CPU device of its own, builds the same (seed, step) Poisson
batches as every other process and feeds only its own shard. Arguments after
``--`` go to dpjax-train unchanged; ``--config.perf.num_devices=0`` (all
devices of all processes) is added.

    python scripts/multihost_local.py --num-processes 2 -- \\
        --workdir /tmp/multihost --config.privacy.steps=6

On a real cluster, start one dpjax-train per host with
``--config.perf.distributed=True`` under SLURM / Open MPI / Cloud TPU (JAX
detects the cluster), or call ``jax.distributed.initialize(coordinator,
num_processes, process_id)`` before ``train.train_and_evaluate`` as
``_child`` below does. See docs/SCALE.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _child(process_id: int, num_processes: int, port: int,
           train_args: list[str]) -> None:
  # pylint: disable=g-import-not-at-top
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', num_processes=num_processes,
                             process_id=process_id)
  # Before the import: ml_collections reads the --config.* flags from argv.
  sys.argv = ['dpjax-train', '--config.perf.num_devices=0'] + train_args
  from dpjax import main as main_lib
  main_lib.main()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-processes', type=int, default=2)
  parser.add_argument('--process-id', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, help=argparse.SUPPRESS)
  args, train_args = parser.parse_known_args()
  train_args = [a for a in train_args if a != '--']
  if args.process_id is not None:
    _child(args.process_id, args.num_processes, args.port, train_args)
    return
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, f'--num-processes={args.num_processes}',
           f'--process-id={i}', f'--port={port}', '--'] + train_args,
          env=env, stdout=None if i == 0 else subprocess.DEVNULL)
      for i in range(args.num_processes)]
  sys.exit(max(p.wait() for p in procs))


if __name__ == '__main__':
  main()
