"""Launch scripts for clusters: local processes, Cloud TPU VM pods, SLURM and Kubernetes."""
