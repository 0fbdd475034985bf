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

Every argument is checked before the model loads (numbers, ``--device``, ``--out``, text that is not UTF-8, an
empty ``--answer``, a completion without a chain of thought); a user error ends with one sentence and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from atmanrl.config import UserError, device_arg, number_arg, text_arg
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
PAPER_STEPS, PAPER_LR = SaliencyConfig().steps, SaliencyConfig().lr  # section 3.4: 200 steps at lr 1e-3
CPU_STEPS = 20  # explain's own CPU default: SaliencyConfig.compressed(20), the paper's schedule in 20 steps


def cot_text(completion: str) -> str:
    """The completion's text before its first ``#####``; one without any chain of thought is a user error."""
    cot = completion.split(DELIMITER, 1)[0].rstrip()
    if not cot.strip():
        raise UserError(f"--completion has no chain of thought before {DELIMITER!r}: nothing to explain")
    return cot


def build_input(tokenizer, question: str, completion: str, answer: str) -> tuple[SaliencyInput, list[str]]:
    """The saliency input and the CoT tokens as text, one string per token."""
    prompt = tokenizer.chat([{"role": "user", "content": question}])
    cot = tokenizer.encode(cot_text(completion))
    x = SaliencyInput.from_parts(prompt, cot, tokenizer.encode(" " + DELIMITER), tokenizer.encode(" " + answer.strip()))
    return x, [tokenizer.decode([t]) for t in cot]


def output_paths(text: str) -> tuple[Path, Path]:
    """(HTML page, Figure 1 PNG) from ``--out NAME.html``; a directory or another suffix is an error."""
    out = Path(text)
    if text.endswith(("/", "\\")) or out.is_dir():
        raise UserError(f"--out {text} is a directory; pass a file name such as {out / 'explain.html'}")
    if out.suffix.lower() != ".html":
        raise UserError(f"--out {out}: name the page NAME.html (NAME.png, the Figure 1 picture, goes next to it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {text}: cannot create its directory ({e.strerror}); choose another --out") from None
    return out, out.with_suffix(".png")


def load_model(name: str, device):
    """The model, refused (one sentence) when it cannot be read or holds NaN/inf weights."""
    from atmanrl.model import load
    from atmanrl.rl.checkpointing import nonfinite_parameters

    try:
        model, tokenizer = load(name, dtype=torch.float32, device=device)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name}: {e}") from None
    bad = nonfinite_parameters(model, collective=False)
    if bad:
        raise UserError(f"--model {name}: the weights {bad[:5]} hold NaN/inf values; explain an intact model")
    return model.eval(), tokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=text_arg("--model"), default="smollm2-135m-instruct",
                        help="embedded name, HF directory or .gguf")
    parser.add_argument("--question", type=text_arg("--question", empty=False), default=QUESTION)
    parser.add_argument("--completion", type=text_arg("--completion", empty=False), default=COMPLETION,
                        help="the model's completion: CoT, then ##### answer")
    parser.add_argument("--answer", type=text_arg("--answer", empty=False), default=ANSWER,
                        help="the gold answer (teacher-forced after #####)")
    parser.add_argument("--steps", type=number_arg(int, "mask steps", 1),
                        help=f"mask steps (paper: {PAPER_STEPS}; CPU default: {CPU_STEPS})")
    parser.add_argument("--lr", type=number_arg(float, "mask learning rate", 0, low_open=True),
                        help="mask learning rate (default: 1e-3 * 200 / steps)")
    parser.add_argument("--reward", choices=["reenable", "eq3"], default="reenable")
    parser.add_argument("--no-atman", action="store_true", help="skip the one-token-at-a-time ATMAN comparison")
    parser.add_argument("--no-reopen", action="store_true", help="skip the re-open-one comparison (beyond the paper)")
    parser.add_argument("--reopen-init", type=number_arg(float, "re-open-one's suppression init; bias 10 x it",
                                                         high=0, high_open=True), default=-5.0,
                        help="suppression of the hidden CoT for re-open-one: bias 10 x this (default -5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=text_arg("--out"), default="outputs/explain.html",
                        help="NAME.html: the HTML heat map; the Figure 1 PNG is written to NAME.png")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        explain(args)
    except UserError as e:
        print(f"explain.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def explain(args) -> Path:
    device = device_arg("--device", args.device)
    cot_text(args.completion)  # before the model loads
    html_path, png_path = output_paths(args.out)
    model, tokenizer = load_model(args.model, device)
    x, cot_tokens = build_input(tokenizer, args.question, args.completion, args.answer)
    steps = args.steps if args.steps is not None else PAPER_STEPS if device.type != "cpu" else CPU_STEPS
    lr = args.lr if args.lr is not None else SaliencyConfig.compressed(steps).lr
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
    try:
        html_path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {html_path} ({e.strerror}); free space or choose another --out") from None
    print(f"\nwrote {html_path.resolve()}")
    if result.ok:
        from atmanrl.saliency.figure1 import figure1

        figure1(result, cot_tokens, png_path, answer_row=x.answer[0] - x.cot[0],
                title=f"AtMan mask, {args.model}, {steps} steps at lr {lr:g}")
        print(f"wrote {png_path.resolve()}")
    return html_path


if __name__ == "__main__":
    sys.exit(main())
