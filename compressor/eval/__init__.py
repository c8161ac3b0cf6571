"""Evaluation on any model: tasks.py runs a list of named tasks from one registry (base.py), each
task with its own options object: perplexity.py (`wikitext2_ppl`, `code_ppl`), humaneval.py
(`humaneval`, its programs run by sandbox/), lmeval.py (every other name, through lm-eval).
runner.py loads a model by spec and records what was evaluated; report.py and plots.py compare."""
