#!/usr/bin/env python3
"""Build the committed Llama parity fixture for experiments/tests/parity.rs.

Writes experiments/tests/fixtures/tiny-llama/ -- a complete Hugging Face LlamaForCausalLM directory
(config.json and model.safetensors via save_pretrained, tokenizer.json: a byte-level BPE trained
here with the `tokenizers` package, with SmolLM2's special tokens at ids 0, 1, 2) -- and
experiments/tests/fixtures/tiny-llama-reference.json with what transformers computes: the token
ids of two text windows, full logit rows at a few positions, the sum and sum of squares of every
logit row, the next-token NLL and perplexity, and the rotary inverse frequencies transformers
derives for each RoPE type ablate implements (default, linear, llama3) at two head widths.

The model exercises everything ablate's Llama has to get right: grouped-query attention (4 query
heads, 2 key/value heads), an untied head, RMS norm weights away from 1, and llama3 RoPE scaling
with a short original context, so that high, medium (interpolated) and low frequencies all occur.
Every tensor is redrawn at a scale where attention and MLP matter, so a swapped projection, a
wrong rotate-half or a missing repeat of the key/value heads shows in the logits.

Run with the reference env:  bash scripts/pyenv.sh && ~/.cache/ablate/pyenv/bin/python scripts/parity_fixture_llama.py
"""
import copy
import json
import math
import os
import sys

import torch
import transformers
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "experiments", "tests", "fixtures")
OUT = os.path.join(FIX, "tiny-llama")

# Training text for the tokenizer, written for this fixture (no licence questions).
TEXT = """\
A second family of models joins the first. Its layers normalise by the root of the mean square,
turn every query and key by an angle that grows with the position, and gate the hidden layer with
a smooth switch before it is projected back. Fewer heads carry keys and values than carry queries;
each key and value head is shared by a small group of query heads, which saves memory when text is
generated one token at a time. The head that reads out the next token may share its weights with
the table that looks tokens up, or keep a table of its own. Freezing, gradual unfreezing and the
rest of the ablation work the same way on both families, because each model says which part every
weight belongs to. Numbers are compared with the reference implementation, never guessed.
"""

VOCAB = 512
TOK_VOCAB = 420
T = 64  # tokens per window; two windows form the batch
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOK_VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def config(**over):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
        attn_implementation="eager",
    )
    kw.update(over)
    return LlamaConfig(**kw)


def inv_freqs():
    """transformers' inverse frequencies per RoPE type, at two head widths and thetas."""
    out = []
    scalings = {
        "default": None,
        "linear": {"rope_type": "linear", "factor": 2.5},
        "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    }
    for head_dim, theta, heads in [(16, 10000.0, 4), (64, 100000.0, 9)]:
        for name, scaling in scalings.items():
            # A fresh copy each time: LlamaConfig writes rope_theta into the dict it is given.
            scaling = copy.deepcopy(scaling)
            recorded = copy.deepcopy(scaling)
            cfg = config(hidden_size=head_dim * heads, num_attention_heads=heads,
                         num_key_value_heads=heads, head_dim=head_dim, rope_theta=theta,
                         rope_scaling=scaling, max_position_embeddings=256)
            rot = LlamaRotaryEmbedding(cfg)
            assert rot.attention_scaling == 1.0
            out.append({
                "head_dim": head_dim,
                "rope_theta": theta,
                "rope_scaling": recorded,
                "max_position_embeddings": 256,
                "inv_freq": [float(x) for x in rot.inv_freq.float().tolist()],
            })
    return out


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    for i, s in enumerate(SPECIAL):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    vocab = tok.get_vocab_size()
    assert vocab <= VOCAB, vocab

    torch.manual_seed(4321)
    cfg = config()
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                # nn.Linear [out, in]: std 1/sqrt(in) keeps activations O(1) through the blocks.
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    model.eval()
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
        "generated_by": "scripts/parity_fixture_llama.py",
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
        "inv_freq": inv_freqs(),
    }
    with open(os.path.join(FIX, "tiny-llama-reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(f"fixture: tokenizer vocab {vocab}, perplexity {ref['perplexity']:.6f}, "
          f"logit std {logits.std().item():.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
