# shellcheck shell=bash
# Site settings for the Slurm scripts. Copy to slurm/env.sh and edit; the scripts are never edited.
# Sourced twice: by your shell before submitting (sbatch reads the SBATCH_* variables itself), and
# by every job before srun starts the ranks (venv, modules, caches; srun passes them to all nodes).

# Where and as whom jobs run (sbatch's own input variables; command-line options override them).
export SBATCH_PARTITION=gpu
export SBATCH_ACCOUNT=my_project
export SBATCH_TIMELIMIT=04:00:00
export SBATCH_GPUS_PER_NODE=8

# Ranks per node: defaults to the GPUs Slurm gives each node; set it on CPU-only clusters.
# export NPROC_PER_NODE=2

# Software: the cluster's modules, then the venv this repository was installed into.
# module load cuda/12.4
# source "$HOME/softprompt/.venv/bin/activate"

# Caches on a filesystem every node sees: tokenized data, the tiny model, HF downloads, W&B.
# export SOFTPROMPT_CACHE=/scratch/$USER/softprompt
# export HF_HOME=/scratch/$USER/huggingface
# export WANDB_PROJECT=softprompt WANDB_DIR=/scratch/$USER/wandb
