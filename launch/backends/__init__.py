"""One module per way of starting a run: local, torchrun (multi-node), deepspeed (hostfile), slurm (sbatch)."""
