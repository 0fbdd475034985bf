"""The toy world's warm start: a tiny Llama fitted by supervised fine-tuning on gold CoTs of all three styles.

    python -m atmanrl.toy.sft                    # build (or reuse) the cached model, print its directory
    atmanrl.model.load("toyworld-sft")           # the same, then load it

What is notable here:
- **Cached by its settings.** The model directory is ``$ATMANRL_CACHE/toyworld-sft-<hash>`` (default
  ``~/.cache/atmanrl``), the hash taken over every field of ``SFTSettings``; a directory is used only when it is
  complete (written to a temporary name, renamed at the end), so an interrupted build starts over, and processes
  that build it at the same time (the ranks of a ``torchrun``) do not clash.
- **Styles at equal rates.** Every training example draws its style uniformly from dense / filler / distractor,
  so the policy writes each at comparable rates before RL.
- **Loss on the completion only** (CoT + ``#####`` + answer + ``</s>``), as instruction tuning does.
- Seeded end to end (problems, styles, initialisation, batches): the same settings give the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from atmanrl.tasks import toyworld as tw


@dataclass(frozen=True)
class SFTSettings:
    hidden_size: int = 96
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 256
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    problems: int = 4000  # training-split problems the examples are drawn from
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("ATMANRL_CACHE", Path.home() / ".cache" / "atmanrl"))


def model_config(settings: SFTSettings, vocab_size: int):
    from atmanrl.model.llama import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=settings.hidden_size,
                       intermediate_size=settings.intermediate_size, num_hidden_layers=settings.layers,
                       num_attention_heads=settings.heads, num_key_value_heads=settings.heads, rope_scaling=None,
                       rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=True)


def examples(tokenizer, problems: list, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: tokens ``(n, L)`` right-padded, and the loss mask over predicted positions ``(n, L - 1)``."""
    rows, masks = [], []
    for _ in range(n):
        p = rng.choice(problems)
        words, _ = tw.gold_cot(p, rng.choice(tw.STYLES), rng)
        prompt = [tokenizer.bos_id, *tokenizer.encode(p.question)]
        completion = tokenizer.encode(tw.completion_text(words, p.gold))
        rows.append(prompt + completion)
        masks.append([0] * (len(prompt) - 1) + [1] * len(completion))
    L = max(map(len, rows))
    tokens = torch.tensor([r + [tokenizer.pad_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (L - 1 - len(m)) for m in masks], dtype=torch.float32)
    return tokens, mask


def train_sft(settings: SFTSettings, out: Path, log=print) -> Path:
    """Fit the warm start and write it (weights, config.json, tokenizer) to ``out``."""
    from atmanrl.model import save_hf
    from atmanrl.model.llama import Llama

    torch.manual_seed(settings.seed)
    tokenizer = tw.build_tokenizer()
    model = Llama(model_config(settings, tokenizer.vocab_size))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(settings.seed))
    problems = tw.toy_problems(settings.problems, settings.seed, "train")
    rng = random.Random(f"sft/{settings.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    log(f"[sft] tiny Llama, {model.num_parameters / 1e6:.2f}M parameters, {settings.steps} steps of "
        f"{settings.batch_size} examples -> {out}")
    t0, running = time.perf_counter(), None
    model.train()
    for step in range(settings.steps):
        warm = min(1.0, (step + 1) / settings.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in opt.param_groups:
            group["lr"] = settings.lr * warm * (0.05 + 0.95 * cosine)
        tokens, mask = examples(tokenizer, problems, rng, settings.batch_size)
        logits = model(tokens[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - t0
            log(f"[sft] step {step + 1}/{settings.steps} loss {running:.3f} | {elapsed:.0f}s, "
                f"ETA {elapsed / (step + 1) * (settings.steps - step - 1):.0f}s")
    model.eval()
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # per process: ranks of a torchrun may build at once
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tmp)
    tokenizer.save(tmp)
    (tmp / "sft_settings.json").write_text(json.dumps(dataclasses.asdict(settings), indent=2) + "\n")
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: same settings and seed, so the same weights; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def sft_model_dir(settings: SFTSettings = SFTSettings(), root: Path | None = None, log=None) -> Path:
    """The cached warm start for ``settings``: built on first use (minutes on a CPU), reused afterwards."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = (root or cache_root()) / f"toyworld-sft-{settings.key()}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        log(f"[sft] reusing the toy world warm start in {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return train_sft(settings, out, log)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=SFTSettings.steps)
    parser.add_argument("--seed", type=int, default=SFTSettings.seed)
    parser.add_argument("--root", type=Path, default=None, help="cache directory (default: $ATMANRL_CACHE or "
                                                                  "~/.cache/atmanrl)")
    args = parser.parse_args(argv)
    print(sft_model_dir(SFTSettings(steps=args.steps, seed=args.seed), args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
