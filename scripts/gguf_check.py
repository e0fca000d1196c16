#!/usr/bin/env python3
"""Reference side of ablate's GGUF tests (experiments/tests/gguf.rs).

    gguf_check.py FILE.gguf OUT_DIR < request.json

request.json: {"texts": [...], "tensors": [names...], "ids": [[...]], "dir": "imported/hf/dir"}
Writes OUT_DIR/<tensor>.f32 (the `gguf` package's own dequantization of each named tensor,
little-endian f32 in the file's element order) and prints one JSON object:
  "tokens":      ids of each text from transformers' tokenizer loaded with gguf_file=
  "tokens_dir":  ids of each text from transformers' tokenizer loaded from `dir` (ablate's import)
  "logits":      path of a raw f32 file with the logits of transformers' LlamaForCausalLM loaded
                 with gguf_file= (f32) on `ids` (batch, T, vocab)
  "nll":         summed next-token NLL over `ids` and the count of predicted tokens
"""
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    path, out = sys.argv[1], sys.argv[2]
    req = json.load(sys.stdin)
    os.makedirs(out, exist_ok=True)
    reader = GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for name in req.get("tensors", []):
        t = by_name[name]
        x = dequantize(t.data, t.tensor_type).astype("<f4")
        x.tofile(os.path.join(out, name + ".f32"))

    folder, file = os.path.split(os.path.abspath(path))
    res = {}
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    res["tokens"] = [tok(t, add_special_tokens=True)["input_ids"] for t in req.get("texts", [])]
    if req.get("dir"):
        tok_dir = AutoTokenizer.from_pretrained(req["dir"])
        res["tokens_dir"] = [tok_dir(t, add_special_tokens=True)["input_ids"] for t in req.get("texts", [])]
    ids = req.get("ids")
    if ids:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        model.eval()
        x = torch.tensor(ids, dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=x).logits.float()
        lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        nll = -lp.gather(-1, x[:, 1:, None]).sum().item()
        lpath = os.path.join(out, "logits.f32")
        logits.numpy().astype("<f4").tofile(lpath)
        res["logits"] = lpath
        res["shape"] = list(logits.shape)
        res["nll"] = nll
        res["predicted"] = int(x[:, 1:].numel())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
