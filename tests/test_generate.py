"""The generator: exact against transformers' greedy decoding, repeatable, padding-invariant, and in log-prob
parity with the trainer's plain forward (``sequence_logprobs``)."""

import pytest
import torch
from references import hf_twin

import atmanrl.model.generate as generate_module
from atmanrl.model.generate import _top_p_filter, compile_count, generate, sampling_noise, sequence_logprobs
from atmanrl.model.llama import Llama, LlamaConfig

PARITY_TOL = 1e-4  # float32, generator (KV cache, left padding) vs one plain forward
PAD_TOL = 1e-5  # the same sequence alone vs in a padded batch


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rope_scaling=None)
    # std 0.2 makes the next-token distribution peaked enough that greedy decoding has no near-ties.
    return Llama(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_equals_transformers_on_smollm2(smollm2):
    model, tok = smollm2
    prompts = [tok.chat([{"role": "user", "content": "What is 12 times 7? Explain briefly."}]),
               tok.chat([{"role": "user", "content": "Name three colours."}])]
    assert len(prompts[0]) != len(prompts[1])
    ours = generate(model, prompts, max_new_tokens=32, greedy=True)  # one left-padded batch
    hf = hf_twin(model)
    for prompt, completion in zip(prompts, ours):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0, top_p=None, top_k=None, temperature=None)
        assert completion.tokens == ref[0, len(prompt):].tolist()
        assert completion.finished is False and len(completion.logprobs) == 32


def test_sampling_with_a_seed_repeats(tiny):
    prompts = random_prompts([5, 9, 3], 101, seed=1)
    run = lambda seed: generate(tiny, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9,
                                seed=seed)
    a, b, c = run(7), run(7), run(8)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.tokens for x in a] != [x.tokens for x in c]


def test_padding_invariance(tiny):
    """A prompt alone vs in a batch with longer prompts: same greedy tokens, log-probs within PAD_TOL. The stop
    ids end some rows early, so the batch is also compacted mid-generation."""
    short, *longer = random_prompts([3, 11, 8, 6], 101, seed=2)
    stop = [7, 13, 42]
    alone = generate(tiny, [short], max_new_tokens=20, greedy=True, stop_ids=stop)[0]
    batch = generate(tiny, [*longer[:2], short, longer[2]], max_new_tokens=20, greedy=True, stop_ids=stop)
    assert batch[2].tokens == alone.tokens
    assert batch[2].finished == alone.finished
    assert max(abs(a - b) for a, b in zip(batch[2].logprobs, alone.logprobs)) <= PAD_TOL
    for prompt, completion in zip([*longer[:2], longer[2]], [batch[0], batch[1], batch[3]]):
        solo = generate(tiny, [prompt], max_new_tokens=20, greedy=True, stop_ids=stop)[0]
        assert completion.tokens == solo.tokens


def test_stop_token_included_and_finished(tiny):
    stop = list(range(0, 101, 4))  # a quarter of the vocabulary: rows stop within a few tokens
    out = generate(tiny, random_prompts([4, 7, 5, 9], 101, seed=3), max_new_tokens=30, temperature=1.0,
                   stop_ids=stop, seed=0)
    assert any(c.finished for c in out)
    for c in out:
        assert len(c.tokens) == len(c.logprobs)
        assert not any(t in stop for t in c.tokens[:-1])  # nothing after a stop token
        assert c.finished == (c.tokens[-1] in stop)
        assert c.finished or len(c.tokens) == 30


def test_on_step_counts_every_decode_step_and_token(tiny):
    """Progress hook: one call per decode step, with the number of tokens that step produced (rows still running,
    finished rows dropped or not), so the calls add up to the completions' lengths."""
    stop = list(range(0, 101, 4))
    calls = []
    out = generate(tiny, random_prompts([4, 7, 5, 9, 6], 101, seed=3), max_new_tokens=30, temperature=1.0,
                   stop_ids=stop, seed=0, on_step=calls.append)
    lengths = [len(c.tokens) for c in out]
    assert len(calls) == max(lengths) and sum(calls) == sum(lengths)
    assert calls == [sum(n > t for n in lengths) for t in range(max(lengths))]


def test_identical_prompts_share_a_prefill(tiny):
    a, b = random_prompts([6, 9], 101, seed=4)
    out = generate(tiny, [a, b, a], max_new_tokens=10, greedy=True)
    assert out[0].tokens == out[2].tokens == generate(tiny, [a], max_new_tokens=10, greedy=True)[0].tokens


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprob_parity_with_plain_forward(tiny, temperature):
    prompts = random_prompts([3, 12, 7, 7], 101, seed=5)
    out = generate(tiny, prompts, max_new_tokens=16, temperature=temperature, stop_ids=[5],
                   seed=1)
    logp, mask = sequence_logprobs(tiny, prompts, [c.tokens for c in out], temperature=temperature)
    for i, c in enumerate(out):
        assert mask[i].sum() == len(c.tokens)
        assert (logp[i, : len(c.tokens)] - torch.tensor(c.logprobs)).abs().max() <= PARITY_TOL
        assert (logp[i, len(c.tokens):] == 0).all()


def test_logprob_parity_on_smollm2(smollm2):
    model, tok = smollm2
    prompts = [tok.chat([{"role": "user", "content": q}]) for q in ["Hi!", "What is the capital of France? Why?"]]
    out = generate(model, prompts, max_new_tokens=24, temperature=0.7, stop_ids=tok.stop_ids,
                   seed=0)
    with torch.inference_mode():
        logp, _ = sequence_logprobs(model, prompts, [c.tokens for c in out], temperature=0.7)
    for i, c in enumerate(out):
        assert (logp[i, : len(c.tokens)] - torch.tensor(c.logprobs)).abs().max() <= PARITY_TOL


def test_sequence_logprobs_carries_gradients(tiny):
    prompts, completions = random_prompts([4, 6], 101, seed=6), random_prompts([3, 5], 101, seed=7)
    logp, mask = sequence_logprobs(tiny, prompts, completions)
    logp[mask].sum().backward()
    assert tiny.embed_tokens.weight.grad is not None and tiny.embed_tokens.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # sorted: 0.5, 0.25, 0.15, 0.1 -> mass before each: 0, 0.5, 0.75, 0.9
    assert _top_p_filter(probs, 0.5).tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert _top_p_filter(probs, 0.6).tolist() == [[0.0, 0.5, 0.0, 0.25]]
    assert _top_p_filter(probs, 1.0).tolist() == probs.tolist()


def test_tiny_top_p_is_greedy(tiny):
    prompts = random_prompts([5, 8], 101, seed=8)
    sampled = generate(tiny, prompts, max_new_tokens=10, top_p=1e-6, seed=0)
    greedy = generate(tiny, prompts, max_new_tokens=10, greedy=True)
    assert [c.tokens for c in sampled] == [c.tokens for c in greedy]


def test_bad_arguments_say_what_to_do(tiny):
    with pytest.raises(ValueError, match="greedy=True"):
        generate(tiny, [[1, 2]], max_new_tokens=3, temperature=0.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        generate(tiny, [[1, 2]], max_new_tokens=3, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [[1, 2]], max_new_tokens=3, top_p=float("nan"))
    with pytest.raises(ValueError, match=r"prompt 1 has token id 101 at position 2, outside the model's vocabulary"):
        generate(tiny, [[1, 2], [3, 4, 101]], max_new_tokens=3)
    with pytest.raises(ValueError, match="pad_id -1 is outside"):
        generate(tiny, [[1, 2], [3]], max_new_tokens=3, pad_id=-1)
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_position_embeddings {limit}.*lower max_new_tokens"):
        generate(tiny, [[1, 2]], max_new_tokens=limit - 1)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(tiny, [[1, 2], [3]], max_new_tokens=3, seed=[1])
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [[1, 2]], max_new_tokens=3, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1, 2], []], max_new_tokens=3)


def test_a_rows_samples_depend_only_on_its_prompt_and_seed(tiny):
    """Per-row counter-based noise: the same (prompt, seed) samples the same tokens alone, in another batch, at
    another row, next to longer (padded) prompts; another seed samples other tokens."""
    a, b, c = random_prompts([4, 10, 7], 101, seed=9)
    kw = dict(max_new_tokens=14, temperature=1.0, top_p=0.95, stop_ids=[3])
    alone = generate(tiny, [a], seed=[77], **kw)[0]
    mixed = generate(tiny, [b, a, c, a], seed=[5, 77, 6, 78], **kw)
    assert mixed[1].tokens == alone.tokens and mixed[1].finished == alone.finished
    assert max(abs(x - y) for x, y in zip(mixed[1].logprobs, alone.logprobs)) <= PAD_TOL
    assert mixed[3].tokens != alone.tokens  # same prompt, other seed


def test_gumbel_noise_samples_the_softmax():
    """argmax(logp + noise) over 40,000 row seeds hits each token with its softmax probability (4 sigma)."""
    logp = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]), -1)
    keys = generate_module.row_keys(range(40_000))
    counts = torch.bincount((logp + sampling_noise(keys, 3, 5)).argmax(-1), minlength=5).double()
    p = logp.exp().double()
    sigma = (p * (1 - p) / 40_000).sqrt()
    assert ((counts / 40_000 - p).abs() <= 4 * sigma).all(), (counts / 40_000, p)
    other_step = (logp + sampling_noise(keys, 4, 5)).argmax(-1)
    assert (other_step != (logp + sampling_noise(keys, 3, 5)).argmax(-1)).float().mean() > 0.3


def test_compiled_step_equals_eager_and_does_not_recompile(tiny, monkeypatch):
    """The static-shape step under torch.compile (dynamo, fullgraph: no graph break) gives the eager path's tokens
    and log-probs; a second call with other prompt lengths (same batch size, same cache bucket) compiles nothing.
    The test compiles with the aot_eager backend (graph capture without code generation: inductor's C++ build of
    the step takes minutes on this CPU); benchmarks/gpu.py checks inductor + CUDA graphs on a GPU."""
    compiled = torch.compile(generate_module.decode_one_token, backend="aot_eager", fullgraph=True)
    monkeypatch.setattr(generate_module, "compiled_decode_one_token", lambda mode: compiled)
    prompts = random_prompts([3, 9, 5], 101, seed=10)
    kw = dict(max_new_tokens=12, temperature=0.8, stop_ids=[7, 11], seed=[1, 2, 3])
    eager = generate(tiny, prompts, **kw)
    assert any(c.finished for c in eager)  # finished rows are masked (not dropped) on the compiled path
    before = compile_count()
    static = generate(tiny, prompts, compile=True, **kw)
    assert compile_count() - before >= 1
    assert [c.tokens for c in static] == [c.tokens for c in eager]
    assert [c.finished for c in static] == [c.finished for c in eager]
    assert max(abs(x - y) for s, e in zip(static, eager) for x, y in zip(s.logprobs, e.logprobs)) <= PAD_TOL
    before = compile_count()
    generate(tiny, random_prompts([6, 4, 8], 101, seed=11), compile=True, **kw)
    assert compile_count() == before
