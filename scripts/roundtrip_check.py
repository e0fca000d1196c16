#!/usr/bin/env python3
"""Load a directory written by ablate's save_hf_dir with Hugging Face transformers and print logits.

Usage: roundtrip_check.py DIR < ids.json     where ids.json is {"ids": [[...], ...]} (equal lengths)
Prints one JSON object on stdout: {"transformers": version, "model_class": name, "logits": [B][T][V],
"tokenizer_vocab": n|null, "rope_parameters": dict|null, "tied": bool}.

The model is loaded with AutoModelForCausalLM, so the directory's config.json decides the class
(GPT2LMHeadModel, LlamaForCausalLM); the test checks the class it expects.

Exits non-zero, with the reason on stderr, when from_pretrained reports missing, unexpected or
mismatched weights: transformers would otherwise fill missing weights with random values and the
comparison would fail for a confusing reason (or, for a weight that barely matters, pass).
Used by experiments/tests/roundtrip.rs.
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = sys.argv[1]
    req = json.load(sys.stdin)
    model, info = AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager"
    )
    problems = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        print(f"from_pretrained({path}) loaded incompletely: {problems}", file=sys.stderr)
        return 3
    # A tied head must share its storage with the input embeddings, an untied one must not.
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != bool(model.config.tie_word_embeddings):
        print(f"tie_word_embeddings is {model.config.tie_word_embeddings} but the head tied = {tied}",
              file=sys.stderr)
        return 4
    tok_vocab = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        tok_vocab = len(tok)
    model.eval()
    ids = torch.tensor(req["ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits
    json.dump(
        {
            "transformers": transformers.__version__,
            "model_class": type(model).__name__,
            "logits": logits.tolist(),
            "tokenizer_vocab": tok_vocab,
            "rope_parameters": getattr(model.config, "rope_parameters", None),
            "tied": tied,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
