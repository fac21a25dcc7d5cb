"""The engine: what the dataflow's stages call, usable without Hamilton.

The stage modules of `finetune_module` (what `finetune_module.MODULES` lists) say *what* is
computed, as Hamilton nodes; the modules here say *how*, with plain functions and classes:

| module | what it holds |
| --- | --- |
| `settings` | the run's settings as checked plain-data groups |
| `sources`, `records` | reading data files and databases; checking records, splits, prompts |
| `read_only_sql` | keeping a database read-only while a user's query reads from it |
| `tokens` | padding token, compact token tables (int32 arrays), length caps, truncation |
| `loading` | loading models and tokenizers safely (safetensors only, clear errors) |
| `models` | the model recipe and the one builder of every model |
| `quiet` | a quiet run: the libraries' own bars, log lines and warnings off while it runs |
| `trainer`, `batching`, `memory` | the Trainer as we run it; length-grouped batches; memory |
| `speedups`, `masks` | the CPU speed layer and the families it is proven for; dropout's masks |
| `generation`, `metrics` | batched decoding; ROUGE, labels, losses |
| `distributed` | running under torchrun / accelerate launch |
| `files`, `html_report` | atomic directories; the report's HTML |
"""
