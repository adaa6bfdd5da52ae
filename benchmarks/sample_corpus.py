"""Training text sampled from a model itself, each sample continuing a short prompt taken from a text file.

Self-generated text keeps a fine-tune on the model's own distribution (the idea of data-free distillation and of
LLM-QAT's generated data): a sparse model distilled on it is trained where the dense model puts its mass, not on
a corpus whose format differs from what it will serve (WikiText-2's word-level `<unk>` and ` @-@ `). Used by the
exploratory CPU screen in docs/results.md ("Self-generated training text"):

    PYTHONPATH=src python benchmarks/sample_corpus.py --model smollm2-135m \
        --prompts ../shared/data/lm/wikitext2_tok_valid.txt --sequences 480 --new-tokens 120 --out generated.txt

Prompts are `--prompt-tokens` tokens taken at even steps over the first `--prompt-share` of the prompt file (the
rest is what recipe rounds hold out); sampling at temperature 1 with a fixed seed; each sample ends at EOS or
after `--new-tokens`; samples are written one after the other, separated by a blank line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="embedded name or model folder (causal LM)")
    p.add_argument("--prompts", type=Path, required=True, help="text file the prompts are taken from")
    p.add_argument("--sequences", type=int, default=480)
    p.add_argument("--new-tokens", type=int, default=120)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--prompt-share", type=float, default=0.9, help="prompts come from this first share of the file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if not args.prompts.is_file():
        raise SystemExit(f"--prompts: no file at '{args.prompts}'")
    if min(args.sequences, args.new_tokens, args.prompt_tokens, args.batch_size) < 1 or not 0 < args.prompt_share <= 1:
        raise SystemExit("--sequences, --new-tokens, --prompt-tokens and --batch-size must be >= 1, "
                         "--prompt-share in (0, 1]")

    from lte.loading import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, task="causal-lm").to(device).eval()
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer(args.prompts.read_text())["input_ids"]
    usable = int(len(ids) * args.prompt_share) - args.prompt_tokens
    if usable < args.sequences:
        raise SystemExit(f"--prompts holds too few tokens ({len(ids)}) for {args.sequences} prompts")
    step = usable // args.sequences
    prompts = [ids[i * step: i * step + args.prompt_tokens] for i in range(args.sequences)]
    torch.manual_seed(args.seed)
    texts: list[str] = []
    start = time.time()
    eos = tokenizer.eos_token_id
    for first in range(0, args.sequences, args.batch_size):
        batch = torch.tensor(prompts[first: first + args.batch_size], device=device)
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                 temperature=args.temperature, top_p=1.0, max_new_tokens=args.new_tokens,
                                 pad_token_id=eos, eos_token_id=eos)
        texts += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
        print(f"{len(texts)}/{args.sequences} samples, {time.time() - start:.0f} s", flush=True)
    args.out.write_text("\n\n".join(texts) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
