"""The generator: exact against transformers' greedy decoding, repeatable, padding-invariant, and in log-prob
parity with the trainer's plain forward (``sequence_logprobs``)."""

import weakref

import pytest
import torch
from references import hf_twin
from torch._dynamo.backends.debugging import aot_eager

import atmanrl.model.generate as generate_module
from atmanrl.model.generate import _top_p_filter, generate, sampling_noise, sequence_logprobs
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


@pytest.fixture
def step_compiles(monkeypatch):
    """The compiled path with its step under torch.compile's aot_eager backend (graph capture, fullgraph, static
    shapes, without code generation: inductor's C++ build of the step takes minutes on this CPU;
    benchmarks/gpu.py checks inductor + CUDA graphs on a GPU), fresh dynamo caches and fresh kept KV caches.
    Returns the list of graphs the step compiled (only the step's: eager FlexAttention traces its score_mod with
    dynamo too, which the global ``compile_count`` would also count)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(generate_module.decode_one_token, backend=backend, fullgraph=True, dynamic=False)
    monkeypatch.setattr(generate_module, "compiled_decode_one_token", lambda mode: compiled)
    monkeypatch.setattr(generate_module, "_static_caches", weakref.WeakKeyDictionary())
    yield graphs
    torch._dynamo.reset()


@pytest.fixture
def attention(tiny):
    """Set ``tiny.attention`` for one test (restored afterwards)."""
    def set_kernel(kernel):
        tiny.attention = kernel
    yield set_kernel
    tiny.attention = "auto"


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_compiled_step_equals_eager(tiny, step_compiles, attention, kernel):
    """The static-shape step under torch.compile (dynamo, fullgraph: no graph break), on the SDPA reference and on
    FlexAttention (the kernel it gets on CUDA), gives the eager reference path's tokens and log-probs, with rows that
    stop early (masked, not dropped, on the compiled path) and spare cache rows (3 prompts in a 4-row cache)."""
    prompts = random_prompts([3, 9, 5], 101, seed=10)
    kw = dict(max_new_tokens=12, temperature=0.8, stop_ids=[7, 11], seed=[1, 2, 3])
    eager = generate(tiny, prompts, **kw)
    assert any(c.finished for c in eager) and not all(c.finished for c in eager)
    attention(kernel)
    static = generate(tiny, prompts, compile=True, **kw)
    assert len(step_compiles) == 1
    assert generate_module.static_cache(tiny, 3, 1).batch_size == 4  # the kept cache the call ran in
    assert [c.tokens for c in static] == [c.tokens for c in eager]
    assert [c.finished for c in static] == [c.finished for c in eager]
    assert max(abs(x - y) for s, e in zip(static, eager) for x, y in zip(s.logprobs, e.logprobs)) <= PAD_TOL


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_rollout_eval_rollout_compiles_nothing_new(tiny, step_compiles, attention, kernel):
    """The trainer's sequence on the compiled path: rollouts (8 rows, sampled), a held-out evaluation (2 rows and a
    last chunk of 1, greedy, longer), rollouts again (other prompt lengths, 6 rows, and at Table 1's temperature:
    the temperature is a tensor, not a constant of the graph), evaluation again. The
    first rollout and the first evaluation compile one graph each, then nothing compiles any more; each call's
    tokens equal the eager reference's. A prompt longer than any before grows its cache once (one compile), and
    the grown cache is then reused."""
    rollout = dict(max_new_tokens=10, temperature=1.0, stop_ids=[7, 11])
    evaluation = dict(max_new_tokens=24, greedy=True, stop_ids=[7, 11])

    def check(prompts, **kw):
        seeds = list(range(len(prompts)))
        attention("sdpa")
        eager = generate(tiny, prompts, seed=seeds, **kw)
        attention(kernel)
        assert [c.tokens for c in generate(tiny, prompts, compile=True, seed=seeds, **kw)] == [c.tokens for c in eager]

    check(random_prompts([4, 6, 5, 9, 3, 8, 7, 5], 101, seed=20), **rollout)
    check(random_prompts([12, 5], 101, seed=21), **evaluation)
    assert len(step_compiles) == 2
    check(random_prompts([9], 101, seed=22), **evaluation)  # the evaluation's last, smaller chunk
    check(random_prompts([3, 5, 4, 11, 6, 2, 9, 10], 101, seed=23), **rollout)
    check(random_prompts([7, 4, 6, 5, 8, 3], 101, seed=24), **rollout)  # fewer rows: the same 8-row cache
    check(random_prompts([5, 5, 8, 8, 3, 3, 6, 6], 101, seed=29), **dict(rollout, temperature=0.7))  # Table 1's
    check(random_prompts([6, 14], 101, seed=25), **evaluation)
    assert len(step_compiles) == 2
    check(random_prompts([240, 5], 101, seed=26), **evaluation)  # 264 slots: the 2-row cache grows to 512
    assert len(step_compiles) == 3
    check(random_prompts([3, 7], 101, seed=27), **evaluation)
    check(random_prompts([4, 6, 5, 9, 3, 8, 7, 5], 101, seed=28), **rollout)
    assert len(step_compiles) == 3


def test_compiled_path_reads_the_device_once_per_stop_check(tiny, step_compiles, monkeypatch):
    """No host sync per token: the compiled loop reads its device state (stop flags, tokens produced) once every
    STOP_CHECK_EVERY steps, and on_step still gets one call per step, in order, as on the eager path."""
    reads = []
    check = generate_module._Outputs.check
    monkeypatch.setattr(generate_module._Outputs, "check", lambda self, t, *a: reads.append(t) or check(self, t, *a))
    stop = list(range(0, 101, 4))
    prompts = random_prompts([4, 7, 5, 9, 6], 101, seed=3)
    kw = dict(max_new_tokens=40, temperature=1.0, stop_ids=stop, seed=0)
    eager_calls, compiled_calls = [], []
    generate(tiny, prompts, on_step=eager_calls.append, **kw)
    eager_reads, reads[:] = len(reads), []
    out = generate(tiny, prompts, compile=True, on_step=compiled_calls.append, **kw)
    assert compiled_calls == eager_calls
    assert max(len(c.tokens) for c in out) == len(eager_calls) == eager_reads
    every = generate_module.STOP_CHECK_EVERY
    assert reads == list(range(every - 1, every * len(reads), every))  # steps 15, 31, ...: the last check stopped
    assert len(reads) == -(-len(eager_calls) // every)
    reads[:] = []
    none_stop = generate(tiny, prompts[:2], compile=True, max_new_tokens=40, greedy=True)  # never stops early
    assert [len(c.tokens) for c in none_stop] == [40, 40] and reads == [15, 31, 39]
