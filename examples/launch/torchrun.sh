#!/usr/bin/env bash
# Launch `megatron-lpreg train` on one node of a (multi-node) torchrun job. Run it on every node.
#
#   examples/launch/torchrun.sh CONFIG [key=value ...]
#
# Environment (defaults in brackets):
#   NNODES [1]            nodes in the job
#   NODE_RANK [0]         this node's rank, 0 .. NNODES-1
#   NPROC_PER_NODE [8]    processes (GPUs) per node
#   MASTER_ADDR [localhost], MASTER_PORT [29500]   address of node 0 (the rendezvous)
#   PYTHON [python]       the interpreter with megatron_lpreg installed (e.g. .venv/bin/python)
#   TORCHRUN              launcher command (default: `$PYTHON -m torch.distributed.run` when PYTHON
#                         is set, else `torchrun` from PATH, else `python -m torch.distributed.run`)
#   PLAN [1]              0: skip the memory check (`megatron-lpreg plan`) before starting
#   PLAN_ARGS             extra arguments for plan, e.g. "--gpu-memory-gib 140" on H200
#   FORCE [0]             1: start even when plan says the run does not fit (exit status 3)
#   DRY_RUN [0]           1: pass --dry-run: bring up the process groups, print the layout, exit
#
# Relative paths in CONFIG (model, data, run_dir) are relative to the current directory; start the
# launcher from the repository root. Every node runs the plan (it is a pure computation from the
# model's config.json and the YAML), so all nodes stop together when it says no.
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: examples/launch/torchrun.sh CONFIG [key=value ...]

Runs `megatron-lpreg train --config CONFIG [key=value ...]` under torchrun on this node.
Multi-node: run it on every node with NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) set.
Env: NNODES=1 NODE_RANK=0 NPROC_PER_NODE=8 MASTER_ADDR=localhost MASTER_PORT=29500
     PYTHON=python TORCHRUN= PLAN=1 PLAN_ARGS= FORCE=0 DRY_RUN=0  (see the top of this script)
examples:
  examples/launch/torchrun.sh examples/qwen3_14b/onpolicy.yaml
  NNODES=8 NODE_RANK=3 MASTER_ADDR=node0 examples/launch/torchrun.sh examples/qwen3_14b/onpolicy.yaml
  NPROC_PER_NODE=2 DRY_RUN=1 PLAN=0 examples/launch/torchrun.sh CONFIG parallel.tp=2 parallel.backend=gloo
EOF
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -lt 1 ]] && exit 2 || exit 0
fi
CONFIG=$1
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "torchrun.sh: config file '$CONFIG' not found (run from the repository root?)" >&2
    usage
    exit 2
fi

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
PLAN=${PLAN:-1}
PLAN_ARGS=${PLAN_ARGS:-}
FORCE=${FORCE:-0}
DRY_RUN=${DRY_RUN:-0}

for var in NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT; do
    if [[ ! "${!var}" =~ ^[0-9]+$ ]]; then
        echo "torchrun.sh: $var must be a non-negative integer, got '${!var}'" >&2
        exit 2
    fi
done
if (( NNODES < 1 || NPROC_PER_NODE < 1 || NODE_RANK >= NNODES )); then
    echo "torchrun.sh: need NNODES >= 1, NPROC_PER_NODE >= 1 and NODE_RANK < NNODES" \
         "(got NNODES=$NNODES NODE_RANK=$NODE_RANK NPROC_PER_NODE=$NPROC_PER_NODE)" >&2
    exit 2
fi

if [[ -n "${PYTHON:-}" ]]; then
    DEFAULT_TORCHRUN="$PYTHON -m torch.distributed.run"
elif command -v torchrun >/dev/null 2>&1; then
    PYTHON=python
    DEFAULT_TORCHRUN=torchrun
else
    PYTHON=python
    DEFAULT_TORCHRUN="python -m torch.distributed.run"
fi
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-$DEFAULT_TORCHRUN}"
read -r -a PLAN_EXTRA <<< "$PLAN_ARGS"

log() {
    if [[ "$NODE_RANK" == 0 ]]; then echo "torchrun.sh: $*" >&2; fi
}

# ---------------------------------------------------------------------------------- memory plan
if [[ "$PLAN" != 0 ]]; then
    plan_cmd=("$PYTHON" -m megatron_lpreg.cli plan --config "$CONFIG" --nodes "$NNODES"
              --gpus-per-node "$NPROC_PER_NODE" ${PLAN_EXTRA[@]+"${PLAN_EXTRA[@]}"} "$@")
    log "${plan_cmd[*]}"
    rc=0
    if [[ "$NODE_RANK" == 0 ]]; then
        "${plan_cmd[@]}" || rc=$?
    else
        "${plan_cmd[@]}" >/dev/null || rc=$?
    fi
    if (( rc == 3 )); then
        if [[ "$FORCE" == 1 ]]; then
            log "plan says this run does not fit in GPU memory; FORCE=1: starting anyway"
        else
            echo "torchrun.sh: plan says this run does not fit in GPU memory (see its WARNING lines);" \
                 "not starting. FORCE=1 starts anyway, PLAN=0 skips the check." >&2
            exit 3
        fi
    elif (( rc != 0 )); then
        echo "torchrun.sh: megatron-lpreg plan failed (exit status $rc); not starting." \
             "PLAN=0 skips the check." >&2
        exit "$rc"
    fi
fi

# ---------------------------------------------------------------------------------------- train
train_args=(train --config "$CONFIG")
if [[ "$DRY_RUN" == 1 ]]; then
    train_args+=(--dry-run)
fi
cmd=("${TORCHRUN_CMD[@]}" --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE"
     --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT"
     -m megatron_lpreg.cli "${train_args[@]}" "$@")
log "${cmd[*]}"
exec "${cmd[@]}"
