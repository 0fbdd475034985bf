"""Explain one chain of thought with the learned AtMan mask: which CoT tokens does the gold answer need?

    python experiments/explain.py                          # built-in example on the embedded SmolLM2-135M
    python experiments/explain.py --steps 200 --lr 1e-3    # the paper's schedule exactly
    python experiments/explain.py --model path/to/hf_dir --question "..." --completion "... ##### 12" --answer 12

The sequence is ``chat(question) + CoT + " #####" + " " + gold answer``, where the CoT is the completion's text
before its first ``#####`` (the completion's own answer, if any, is replaced by the gold one, as in training).
The mask over the CoT's key columns is optimised (Eq. 2) and read out (Eq. 3); the CoT is printed with per-token
saliency as terminal colours, with the top tokens listed, and two pictures are written next to each other (paths
printed): ``--out NAME.html``, the HTML heat map, and ``NAME.png``, the paper's Figure 1 for this CoT (the optimised
mask as a heat map of query rows x CoT columns, the per-token saliency over the text, the Eq. 2 loss curve;
``atmanrl.saliency.figure1``, needs matplotlib). The original ATMAN explanation (one token suppressed at a time) is
computed alongside unless ``--no-atman``, and so is ``reopen_one`` (ours, beyond the paper: every CoT token hidden,
one re-opened at a time, the share of the answer loss it restores; ``--reopen-init``, default -5) unless
``--no-reopen``: the learned mask, the original ATMAN and re-opening side by side, in the terminal and on the page.

Default schedule: the paper's 200 steps at lr 1e-3 take minutes on a CPU, so on a CPU the default is the
compressed schedule ``SaliencyConfig.compressed(20)`` (20 steps at lr 1e-2: 10x less time; how close its per-token
saliency comes to the 200-step result is measured in ``benchmarks/README.md``); it says so when it runs.
``--steps 200`` gives the paper's setting (lr defaults to 1e-3 * 200 / steps). ``--steps`` must be at least 1 and
``--lr`` a positive number: a 0 is refused, never replaced by a default.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency
from atmanrl.saliency.atman import atman_explanation, reopen_one
from atmanrl.saliency.render import html_page, ranking, terminal

QUESTION = (
    "Tom has 3 boxes with 4 apples in each box. He eats 2 of the apples. How many apples does Tom have left? "
    "Think step by step, then write ##### followed by the final answer."
)
COMPLETION = (
    "Tom has 3 boxes and each box has 4 apples, so he has 3 * 4 = 12 apples. He eats 2 of them, so he has "
    "12 - 2 = 10 apples left. ##### 10"
)
ANSWER = "10"
DELIMITER = "#####"
PAPER_STEPS, PAPER_LR = 200, 1e-3
CPU_STEPS = 20  # compressed schedule: lr scaled by PAPER_STEPS / CPU_STEPS


def build_input(tokenizer, question: str, completion: str, answer: str) -> tuple[SaliencyInput, list[str]]:
    """The saliency input and the CoT tokens as text, one string per token."""
    cot_text = completion.split(DELIMITER, 1)[0].rstrip()
    if not cot_text.strip():
        raise SystemExit(f"the completion has no chain of thought before {DELIMITER!r}: nothing to explain")
    prompt = tokenizer.chat([{"role": "user", "content": question}])
    cot = tokenizer.encode(cot_text)
    x = SaliencyInput.from_parts(prompt, cot, tokenizer.encode(" " + DELIMITER), tokenizer.encode(" " + answer.strip()))
    return x, [tokenizer.decode([t]) for t in cot]


def _positive(kind, name: str):
    """An argparse type: a finite ``kind`` number > 0, with a sentence on error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    return parse


def _negative(text: str) -> float:
    """An argparse type for ``--reopen-init``: a finite number < 0 (at >= 0 nothing would be suppressed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value >= 0:
        raise argparse.ArgumentTypeError(f"--reopen-init must be < 0 (the CoT's suppression is 10 x it), got {text}")
    return value


def check_device(name: str) -> torch.device:
    """``--device`` as a torch device that exists on this machine, or a SystemExit that says what to pass."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r} is not a device torch knows; pass cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                         f"pass --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported")
    return device


def output_paths(text: str) -> tuple[Path, Path]:
    """(HTML page, Figure 1 PNG) from ``--out NAME.html``; a directory or another suffix is an error."""
    out = Path(text)
    if text.endswith(("/", "\\")) or out.is_dir():
        raise SystemExit(f"--out {text} is a directory; pass a file name such as {out / 'explain.html'}")
    if out.suffix.lower() != ".html":
        raise SystemExit(f"--out {out}: name the page NAME.html (NAME.png, the Figure 1 picture, goes next to it)")
    return out, out.with_suffix(".png")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded name, HF directory or .gguf")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--completion", default=COMPLETION, help="the model's completion: CoT, then ##### answer")
    parser.add_argument("--answer", default=ANSWER, help="the gold answer (teacher-forced after #####)")
    parser.add_argument("--steps", type=_positive(int, "--steps"),
                        help=f"mask steps (paper: {PAPER_STEPS}; CPU default: {CPU_STEPS})")
    parser.add_argument("--lr", type=_positive(float, "--lr"), help="mask learning rate (default: 1e-3 * 200 / steps)")
    parser.add_argument("--reward", choices=["reenable", "eq3"], default="reenable")
    parser.add_argument("--no-atman", action="store_true", help="skip the one-token-at-a-time ATMAN comparison")
    parser.add_argument("--no-reopen", action="store_true", help="skip the re-open-one comparison (beyond the paper)")
    parser.add_argument("--reopen-init", type=_negative, default=-5.0,
                        help="suppression of the hidden CoT for re-open-one: bias 10 x this (default -5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/explain.html",
                        help="NAME.html: the HTML heat map; the Figure 1 PNG is written to NAME.png")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    html_path, png_path = output_paths(args.out)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create its directory ({e.strerror}); choose another --out") from None

    from atmanrl.model import load

    model, tokenizer = load(args.model, dtype=torch.float32, device=device)
    model.eval()
    x, cot_tokens = build_input(tokenizer, args.question, args.completion, args.answer)
    steps = args.steps if args.steps is not None else PAPER_STEPS if device.type != "cpu" else CPU_STEPS
    lr = args.lr if args.lr is not None else PAPER_LR * PAPER_STEPS / steps
    note = f"{steps} mask steps at lr {lr:g}"
    if (steps, lr) != (PAPER_STEPS, PAPER_LR):
        keeps = math.isclose(steps * lr, PAPER_STEPS * PAPER_LR, rel_tol=1e-6)
        note += (f" (the paper: {PAPER_STEPS} steps at lr {PAPER_LR:g}; " + (
            "this compressed schedule keeps steps x lr, see benchmarks/README.md" if keeps else
            f"steps x lr = {steps * lr:g} instead of {PAPER_STEPS * PAPER_LR:g}: the mask can move a different "
            f"distance, and the reward's scale follows it") + "; --steps 200 --lr 1e-3 for the paper's)")
    print(f"sequence: {len(x.tokens)} tokens (prompt {x.prompt_len}, CoT {x.n_cot}, answer {x.n_answer}); {note}",
          file=sys.stderr)

    start = time.perf_counter()

    def progress(step, mask, losses):
        if (step + 1) % 10 == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}: answer loss {losses[0].item():.4f} "
                  f"({time.perf_counter() - start:.0f}s)", file=sys.stderr)

    config = SaliencyConfig(steps=steps, lr=lr, reward=args.reward, return_mask=True)
    (result,) = saliency(model, [x], config, on_step=progress)
    atman = None if args.no_atman else atman_explanation(model, x)
    reopen = None if args.no_reopen else reopen_one(model, [x], init=args.reopen_init)[0]

    print(terminal(cot_tokens, result.saliency))
    print(f"\nmost salient CoT tokens (1 - mean Ĥ over causal rows):\n{ranking(cot_tokens, result.saliency)}")
    print(f"\nsaliency reward: reenable {result.reward_reenable:+.5f}, eq3 {result.reward_eq3:+.5f}; answer loss: "
          f"no mask {result.unmasked_loss:.4f}, initial mask {result.initial_loss:.4f}, "
          f"last step {result.loss_curve[-1]:.4f}" + ("  [SATURATED]" if result.saturated else ""))
    if atman is not None:
        print(f"\noriginal ATMAN (answer CE change when one token is suppressed, bias {atman.suppression:g}):\n"
              f"{ranking(cot_tokens, atman.delta_loss)}")
    if reopen is not None:
        print(f"\nre-open one (beyond the paper; share of the answer loss restored by re-opening the token alone, "
              f"bias {10 * args.reopen_init:g}):\n{ranking(cot_tokens, reopen.restored)}")
    page = html_page(result, cot_tokens, question=args.question, answer=args.answer, atman=atman, reopen=reopen,
                     config_note=f"Model {args.model}; {note}.")
    html_path.write_text(page, encoding="utf-8")
    print(f"\nwrote {html_path.resolve()}")
    if result.ok:
        from atmanrl.saliency.figure1 import figure1

        figure1(result, cot_tokens, png_path, answer_row=x.answer[0] - x.cot[0],
                title=f"AtMan mask, {args.model}, {steps} steps at lr {lr:g}")
        print(f"wrote {png_path.resolve()}")
    return html_path


if __name__ == "__main__":
    main()
