#!/usr/bin/env python3
"""The PyTorch twin of `ablate-worker bench`: one training step of the same model on the same batch
shape, in PyTorch eager (transformers' GPT2LMHeadModel or LlamaForCausalLM, float32), timed the
same way.

Same model as ablate (GPT-2: tied head, no dropout, GPT-2 init; Llama: the preset's shape with
grouped-query attention, tied head, no dropout), same step: forward, cross-entropy over the
vocabulary, backward, clip_grad_norm_(1.0), torch.optim.AdamW(betas 0.9/0.999, eps 1e-8, weight
decay 0.01 on matrices). `--freeze-top K` trains only the top K of `--groups` layer groups with
ablate's split (embeddings = group 0; blocks in groups-1 contiguous groups, the top ones taking
the remainder; the final norm and the tied head in the top group). As in ablate, a frozen
embedding lookup reads a detached table, so backward stops at the lowest trainable block and the
table learns only through the tied head. `--lora-rank R` (with `--lora-groups K`) trains PEFT LoRA
adapters (alpha 16, no dropout) on every linear layer of the blocks (of the top K block groups)
with the base frozen, as ablate's `lora` method does.

Prints one JSON object with the keys `ablate-worker bench --json` prints. Run it in the venv of
scripts/pyenv.sh; scripts/bench.sh runs it interleaved with ablate.
"""

import argparse
import json
import os
import statistics
import time

PRESETS = {
    # GPT-2 name: (vocab, n_positions, n_embd, n_layer, n_head, batch, context)
    "tiny": (8192, 128, 256, 4, 4, 8, 128),
    "gpt2": (50257, 1024, 768, 12, 12, 4, 256),
    "gpt2-medium": (50257, 1024, 1024, 24, 16, 2, 256),
}
LLAMA_PRESETS = {
    # Llama name: (vocab, max_positions, hidden, intermediate, layers, heads, kv heads, rope_theta,
    #              batch, context); the same shapes as ablate-worker bench's presets.
    "tiny-llama": (8192, 128, 256, 688, 4, 4, 2, 10000.0, 8, 128),
    "smollm2": (49152, 8192, 576, 1536, 30, 9, 3, 100000.0, 4, 256),
}


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def block_groups(n_layer, groups):
    """ablate's methods::LayerGroups: groups-1 contiguous block groups, the top `rem` one larger."""
    bg = groups - 1
    base, rem = divmod(n_layer, bg)
    out, start = [], 0
    for i in range(bg):
        size = base + (1 if i >= bg - rem else 0)
        out.append(range(start, start + size))
        start += size
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS) + sorted(LLAMA_PRESETS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--context", type=int)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--freeze-top", type=int)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--lora-rank", type=int)
    ap.add_argument("--lora-groups", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (sdpa is its default)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.preset in LLAMA_PRESETS:
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab, npos, d, inter, nl, nh, nkv, theta, batch, context = LLAMA_PRESETS[args.preset]
        batch = args.batch or batch
        context = args.context or context
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=max(npos, context),
                          hidden_size=d, intermediate_size=inter, num_hidden_layers=nl,
                          num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d // nh,
                          rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=True,
                          attention_dropout=0.0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation=args.attn)
        body = model.model
        blocks_of, norm, embed, pos = body.layers, body.norm, body.embed_tokens, None
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        vocab, npos, d, nl, nh, batch, context = PRESETS[args.preset]
        batch = args.batch or batch
        context = args.context or context
        npos = max(npos, context)
        cfg = GPT2Config(vocab_size=vocab, n_positions=npos, n_embd=d, n_layer=nl, n_head=nh,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1)
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation=args.attn)
        body = model.transformer
        blocks_of, norm, embed, pos = body.h, body.ln_f, body.wte, body.wpe
    model.train()

    # Which parameters train (ablate's methods::param_lr).
    emb_on = True
    if args.freeze_top:
        g = args.groups
        if not 1 <= args.freeze_top <= g:
            raise SystemExit(f"--freeze-top {args.freeze_top}: must be between 1 and {g}")
        on = [i + args.freeze_top >= g for i in range(g)]
        emb_on = on[0]
        for p in model.parameters():
            p.requires_grad_(False)
        for gi, blocks in enumerate(block_groups(nl, g)):
            if on[gi + 1]:
                for b in blocks:
                    blocks_of[b].requires_grad_(True)
        if on[g - 1]:
            norm.requires_grad_(True)
            embed.weight.requires_grad_(True)  # through the tied head
        if emb_on:
            embed.weight.requires_grad_(True)
            if pos is not None:
                pos.weight.requires_grad_(True)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        g = args.groups
        k = args.lora_groups or g - 1
        layers = [b for gi, blocks in enumerate(block_groups(nl, g)) if gi + 1 + k >= g
                  for b in blocks]
        if args.preset in LLAMA_PRESETS:
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        else:
            targets = ["c_attn", "c_proj", "c_fc"]
        lcfg = LoraConfig(r=args.lora_rank, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                          fan_in_fan_out=args.preset not in LLAMA_PRESETS,
                          layers_to_transform=layers if len(layers) < nl else None)
        model = get_peft_model(model, lcfg)
        model.train()
        emb_on = True  # the base's embeddings are frozen by PEFT; the lookup is no leaf to cut
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    n_params = sum(p.numel() for p in model.parameters())  # tied wte counted once
    n_train = sum(p.numel() for p in params)

    gen = torch.Generator().manual_seed(1)
    fwd, bwd, optm, tot = [], [], [], []
    loss_v = float("nan")
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, context + 1), generator=gen)
        x, y = ids[:, :-1], ids[:, 1:].reshape(-1)
        if emb_on:
            logits = model(input_ids=x, use_cache=False).logits
        else:
            emb = F.embedding(x, embed.weight.detach())
            logits = model(inputs_embeds=emb, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), y)
        loss_v = loss.item()
        t1 = time.perf_counter()
        loss.backward()
        del loss, logits
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            optm.append(t3 - t2)
            tot.append(t3 - t0)
    step = statistics.median(tot)
    tokens = batch * context
    print(json.dumps({
        "impl_name": "pytorch",
        "preset": args.preset,
        "params": n_params,
        "trainable_params": n_train,
        "batch": batch,
        "context": context,
        "freeze_top": args.freeze_top,
        "lora_rank": args.lora_rank,
        "groups": args.groups,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "forward_s": statistics.median(fwd),
        "backward_s": statistics.median(bwd),
        "optimizer_s": statistics.median(optm),
        "step_s": step,
        "tokens_per_s": tokens / step,
        "model_gflops": 6.0 * n_params * tokens / step / 1e9,
        "peak_rss_mib": peak_rss_mib(),
        "final_loss": loss_v,
        "torch": torch.__version__,
        "attn": args.attn,
    }))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
