#!/bin/bash
# vidalign on N machines under SLURM: one `accelerate launch` per node (srun), one process per GPU.
# Edit the #SBATCH lines, the environment lines and COMMAND, then: sbatch recipes/accelerate/slurm_multinode.sh
# Run from the repository root; OUT (and the run directory) must be on a filesystem every node shares.
# COMMAND is any vidalign command: `generate`, `data pairs`, `data samples`, `eval` and `reward score`
# shard their (prompt, seed) lists over all processes; `train RECIPE` trains with DDP (add
# --use_deepspeed --deepspeed_config_file recipes/accelerate/ds_zero2.json for ZeRO-2, and drop --multi_gpu).
#SBATCH --job-name=vidalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# --- environment (edit) ---------------------------------------------------------------------
source .venv/bin/activate
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
export VIDALIGN_DIST_TIMEOUT=${VIDALIGN_DIST_TIMEOUT:-3600}  # seconds a process waits for the others at a sync point
# export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0        # the interface the nodes reach each other on

# --- what to run (edit) ---------------------------------------------------------------------
COMMAND=(-m align.cli generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --prompts-file prompts.txt
         --num 4 --out runs/samples --resume)

# --- launch: nothing to edit below ----------------------------------------------------------
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MAIN_ADDR=${MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MAIN_PORT=${MAIN_PORT:-29500}
export NUM_MACHINES=$SLURM_NNODES
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
echo "vidalign: $NUM_MACHINES machines x $GPUS_PER_NODE processes, main $MAIN_ADDR:$MAIN_PORT"
# SLURM_NODEID is each node's own rank, so it is expanded on the node (single quotes)
srun --kill-on-bad-exit=1 bash -c 'accelerate launch --multi_gpu --num_machines "$NUM_MACHINES" \
    --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_ADDR" \
    --main_process_port "$MAIN_PORT" --rdzv_backend static --mixed_precision no --dynamo_backend no "$@"' \
    vidalign "${COMMAND[@]}"
