#!/usr/bin/env python3
"""Load a LoRA trial's adapter with PEFT onto its base model and print logits and perplexity.

Usage: peft_check.py BASE_DIR MODEL_DIR [IDS_JSON] < ids.json     where ids.json (or the file
IDS_JSON) is {"ids": [[...], ...]} (equal lengths) and MODEL_DIR is what ablate saved for a LoRA trial: the merged model, with the
adapter in MODEL_DIR/adapter (adapter_config.json, adapter_model.safetensors).

Prints one JSON object: {"peft": version, "adapter_logits": [B][T][V] (PeftModel.from_pretrained
(base, MODEL_DIR/adapter)), "merged_logits": [B][T][V] (AutoModelForCausalLM on MODEL_DIR),
"peft_merged_logits": [B][T][V] (PEFT's own merge_and_unload), "adapter_ppl", "merged_ppl"
(next-token perplexity of the ids under each), "lora_modules": number of LoRA layers PEFT made,
"trainable": PEFT's count of adapter parameters}.

Exits non-zero, with the reason on stderr, when PEFT reports adapter weights it did not load
(a name mismatch would otherwise leave a zero update and a comparison that passes for the wrong
reason). Used by experiments/tests/roundtrip.rs and the end-to-end test.
"""
import json
import math
import os
import sys

import peft
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def ppl(logits, ids):
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
    return math.exp(nll.item())


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    base_dir, model_dir = sys.argv[1], sys.argv[2]
    if len(sys.argv) == 4:
        with open(sys.argv[3]) as f:
            req = json.load(f)
    else:
        req = json.load(sys.stdin)
    ids = torch.tensor(req["ids"], dtype=torch.long)
    load = dict(attn_implementation="eager", torch_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, **load)
    adapter_dir = os.path.join(model_dir, "adapter")
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    # Every stored tensor must have landed on a LoRA layer of the model.
    from safetensors.torch import load_file

    stored = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items()}
    missing = [k for k in stored if k not in state]
    if missing:
        print(f"adapter tensors PEFT did not place: {missing[:5]}", file=sys.stderr)
        return 3
    for k, v in stored.items():
        if not torch.equal(state[k].float(), v.float()):
            print(f"adapter tensor {k} differs after loading", file=sys.stderr)
            return 4
    lora_modules = sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    trainable = sum(v.numel() for k, v in stored.items())
    with torch.no_grad():
        a = model(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(model_dir, **load).eval()
        m = merged(ids).logits
        pm = model.merge_and_unload()(ids).logits
    print(json.dumps({
        "peft": peft.__version__,
        "adapter_logits": a.tolist(),
        "merged_logits": m.tolist(),
        "peft_merged_logits": pm.tolist(),
        "adapter_ppl": ppl(a, ids),
        "merged_ppl": ppl(m, ids),
        "lora_modules": lora_modules,
        "trainable": trainable,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
