#!/bin/sh
# Entrypoint of the compose `search` service: `solversearch "$@"`, but for `search` it first joins the
# Ray cluster at $SOLVERSEARCH_RAY_JOIN as a node with no CPUs and no GPUs.
#
# Why: a Ray driver (`ray.init(address=HOST:PORT)`, what `solversearch search --address` calls) must run
# on a machine that has a Ray node (a raylet); in a container of its own it finds none and fails with
# "No node info found ... when trying to resolve node to connect to". With 0 CPUs and 0 GPUs the node
# runs no trials: they all go to the workers. The node stops with the container.
set -eu

if [ "${1:-}" = "search" ] && [ -n "${SOLVERSEARCH_RAY_JOIN:-}" ]; then
    ray start --address="${SOLVERSEARCH_RAY_JOIN}" --num-cpus=0 --num-gpus=0 --disable-usage-stats >/dev/null
fi
exec solversearch "$@"
