"""The shared core below the stages: what `data`, `train`, `evaluate` and `serve` all need, owned once here.

- `records`: the chat JSONL records every stage reads and writes;
- `pii`: the PII/secret redactor (prepare redacts datasets, serve redacts logs and feedback); its detectors are
  registered in `pii_detectors` and live in `pii_identifiers`, `pii_secrets` and `pii_spans`;
- `examples`: conversations -> token ids with the answers-only loss mask -> batch tensors;
- `loss`: the chunked LM-head cross-entropy and `CausalLMLoss`, the one object training optimises and eval scores;
- `rundir`: a run directory's layout (model/, config.yaml, checkpoints/, eval/NAME/, exports/NAME/).

A stage imports from here (and from `chatforge.models`, `config`, `manifest`, `device`), never from another stage;
tests/test_layering.py checks it.
"""
