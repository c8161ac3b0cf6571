"""Writing and reading compressed checkpoints: checkpoint.py (the folder, its config and the
remote-code shim), gptq_v1.py (the GPTQ v1 format), peft.py (adapters as PEFT LoRA) and
accounting.py (what a model stores)."""
