"""Launcher for shira_dist runs (local, torchrun, deepspeed, SLURM); installed as ``shira_dist.launch``."""
