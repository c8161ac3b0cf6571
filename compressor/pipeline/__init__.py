"""One compression pipeline from a layer source to a sink (session.py), for every recipe.

sources.py: the model in memory, or safetensors shards read one decoder layer at a time (--stream).
sinks.py:   the output folder written at the end, or shards written per layer with a resume journal.
report.py:  compression_report.json from the common facts and each stage's own entries.
"""
