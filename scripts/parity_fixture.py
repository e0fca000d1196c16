#!/usr/bin/env python3
"""Build the committed parity fixture for experiments/tests/parity.rs.

Writes experiments/tests/fixtures/tiny-gpt2/ -- a complete Hugging Face GPT-2 directory
(config.json, model.safetensors via save_pretrained, tokenizer.json: a byte-level BPE trained here
with the `tokenizers` package) -- and experiments/tests/fixtures/tiny-gpt2-reference.json with the
token ids of two text windows and what transformers computes for them: full logit rows at a few
positions, the sum and sum of squares of every logit row (so a difference anywhere in a row shows),
the next-token NLL and the perplexity.

Weights are not left at GPT-2's init (N(0, 0.02), LayerNorm 1/0): with near-zero weights almost any
bug still gives near-uniform logits. Every tensor, LayerNorm and biases included, is redrawn with a
fixed seed at a scale where attention and MLP matter, so a transposed Conv1D, a swapped LayerNorm
weight/bias or a wrong mask shows in the logits.

Run with the reference env:  bash scripts/pyenv.sh && ~/.cache/ablate/pyenv/bin/python scripts/parity_fixture.py
"""
import json
import math
import os
import sys

import torch
import transformers
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "experiments", "tests", "fixtures")
OUT = os.path.join(FIX, "tiny-gpt2")

# Training text for the tokenizer, written for this fixture (no licence questions).
TEXT = """\
The ablation study freezes one group of layers at a time and measures perplexity on held-out text.
A small model learns the shape of words before it learns their meaning; the first layers settle early,
the last layers keep moving. When the top group alone is trained, the loss falls quickly and then stalls.
When every layer is trained, the loss falls slowly at first and then further than before.
Gradual unfreezing opens one more group at each stage, from the top down, and the learning rate of a
lower group is the rate of the group above it divided by a constant factor.
Inheritune keeps the first few blocks of a large model, trains them on a slice of the same text,
and asks how close the small model comes to the large one. Numbers are compared, never guessed.
"""

VOCAB = 320
N_POSITIONS = 64
N_EMBD = 48
N_LAYER = 2
N_HEAD = 4
T = 48  # tokens per window; two windows form the batch


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    vocab = tok.get_vocab_size()
    assert vocab <= VOCAB, vocab
    eot = tok.token_to_id("<|endoftext|>")

    torch.manual_seed(1234)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=eot,
        eos_token_id=eot,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif name.endswith("wte.weight") or name.endswith("wpe.weight"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                # Conv1D [in, out]: std 1/sqrt(in) keeps activations O(1) through the blocks.
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[0]))
    model.eval()
    try:
        model.save_pretrained(OUT, safe_serialization=True)
    except TypeError:  # transformers versions that always write safetensors
        model.save_pretrained(OUT)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    for stray in ("generation_config.json",):
        path = os.path.join(OUT, stray)
        if os.path.exists(path):
            os.remove(path)

    ids_all = tok.encode(TEXT).ids
    assert len(ids_all) >= 2 * T + 10, len(ids_all)
    windows = [ids_all[:T], ids_all[len(ids_all) - T:]]
    ids = torch.tensor(windows, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits.double()  # (2, T, V)
    logp = torch.log_softmax(logits[:, :-1, :], dim=-1)
    nll = -logp.gather(2, ids[:, 1:, None]).squeeze(2)  # (2, T-1)
    total = nll.sum().item()
    count = nll.numel()
    rows = [(0, 0), (0, T // 2), (0, T - 1), (1, 0), (1, T - 1)]
    ref = {
        "generated_by": "scripts/parity_fixture.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "text": TEXT,
        "text_ids_prefix": ids_all[:64],
        "ids": windows,
        "full_rows": [
            {"batch": b, "pos": t, "logits": [round(x, 7) for x in logits[b, t].tolist()]} for b, t in rows
        ],
        "row_sum": [[x for x in r] for r in logits.sum(-1).tolist()],
        "row_sq_sum": [[x for x in r] for r in (logits * logits).sum(-1).tolist()],
        "nll_sum": total,
        "predicted_tokens": count,
        "perplexity": math.exp(total / count),
    }
    with open(os.path.join(FIX, "tiny-gpt2-reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(f"fixture: vocab {vocab}, perplexity {ref['perplexity']:.6f}, "
          f"logit std {logits.std().item():.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
