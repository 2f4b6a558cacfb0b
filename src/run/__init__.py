"""The machinery of a run, under the commands of src/: the configs' resolvers (`config`), the
checks before a run folder is claimed (`checks`), resume (`resume`), the training and evaluation
runs (`training`, `evaluation`) and the results they write (`results`), and what every command
shares: its one-line error report (`cli`), quiet logs (`logs`), callbacks and SLURM (`cluster`),
W&B runs (`wandb_runs`: the W&B run a run logged to, the report's own W&B run)."""
