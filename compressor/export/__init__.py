"""Writing and reading compressed checkpoints: checkpoint.py (the folder, its config and the
remote-code shim, assembled from what the stages declare), peft.py (adapters as PEFT LoRA) and
accounting.py (what a model stores). A format a method owns (a quantisation packing) lives with that
method and reaches the export through the stage's `export` declarations."""
