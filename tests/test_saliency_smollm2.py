"""The saliency module on the real SmolLM2-135M-Instruct (the session fixture ``smollm2``, float32).

The example of docs/DESIGN.md (decision 4): a CoT that states the answer's number once among filler.
The tokens of that number must be among
the three most salient CoT tokens. A short compressed schedule (10 steps at lr 2e-2, steps x lr as in the paper's
200 x 1e-3; see benchmarks/README.md) keeps the test fast.
"""

import torch

from atmanrl.saliency import SaliencyConfig, SaliencyInput, saliency

FILLER_COT = (
    " Let me think. The weather is nice today and the garden is full of flowers. The secret number is 47. Birds are"
    " singing in the trees and the river flows slowly."
)


def test_stated_answer_number_ranks_in_top3(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.chat([{"role": "user", "content": "What is the secret number?"}])
    cot = tokenizer.encode(FILLER_COT)
    x = SaliencyInput.from_parts(prompt, cot, tokenizer.encode(" #####"), tokenizer.encode(" 47"))
    digits = [j for j, t in enumerate(cot) if tokenizer.decode([t]).strip() in ("4", "7", "47")]
    assert digits, "the tokenizer should give the number its own tokens"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and far faster when other jobs share the CPU
    try:
        (r,) = saliency(model, [x], SaliencyConfig.compressed(10))  # 10 steps at lr 2e-2
    finally:
        torch.set_num_threads(threads)
    assert r.ok and not r.saturated
    assert r.loss_curve[-1] < r.initial_loss  # the mask restored some of the answer's probability
    top3 = torch.argsort(r.saliency, descending=True)[:3].tolist()
    assert set(digits) <= set(top3), [tokenizer.decode([cot[j]]) for j in top3]
