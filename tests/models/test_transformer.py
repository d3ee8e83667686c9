"""Rotary's own forward against transformers, the oracle.

Tiny random models built here (no download, no model mark) cover each architecture's
differences: Qwen2's QKV bias, Llama's attention_bias, Mistral's and Qwen2's sliding windows,
llama3 and yarn RoPE scaling, and the structural features (layer slices, early exit,
batches of documents with different lengths, right padding). The real embedded model
(marked `model`) checks logits within 1e-4 and greedy continuations identical to
transformers' own `generate` on real code.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from rotary.cache.buffer import KVBuffer, extend_batch
from rotary.cache.deferred import DeferredForward, writes_of
from rotary.models.batch import Batch
from rotary.models.transformer import Transformer, attention_span, supports

TOL = 1e-4  # fp32 logits


def tiny(kind: str = "llama", **overrides):
    """A small random model of one family, fp32, eval mode; the biases random too (HF inits them to 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    common.update(overrides)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[kind]
    torch.manual_seed(0)
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)  # non-trivial biases and norms
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits for every position of `ids` from one plain transformers forward without a cache: [S, vocab]."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def new_buffer(tf: Transformer, capacity: int = 0) -> KVBuffer:
    c = tf.config
    return KVBuffer(c.n_layers, c.n_kv_heads, c.head_dim, dtype=tf.dtype, capacity=capacity, chunk=16)


def own_logits_in_pieces(tf: Transformer, ids: list[int], pieces: list[int]) -> torch.Tensor:
    """Logits for every position, the ids fed in pieces of the given sizes (then one token at a time)."""
    buffer, out, position = new_buffer(tf), [], 0
    for size in pieces:
        out.append(buffer.extend(ids[position : position + size], tf, logits="all").logits[0])
        position += size
    while position < len(ids):
        out.append(buffer.extend([ids[position]], tf, logits="last").logits)
        position += 1
    return torch.cat(out)


def random_ids(n: int, vocab: int = 97, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------
# Tiny models: every family, every path


FAMILIES = {
    "llama": dict(kind="llama"),
    "llama_attention_bias": dict(kind="llama", attention_bias=True),
    "llama_untied_head": dict(kind="llama", tie_word_embeddings=False),
    "llama3_rope": dict(
        kind="llama",
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "yarn_rope": dict(
        kind="llama",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "qwen2_qkv_bias": dict(kind="qwen2"),
    "qwen2_sliding_layers": dict(kind="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1),
    "mistral_sliding": dict(kind="mistral", sliding_window=7),
    "mistral_full": dict(kind="mistral", sliding_window=None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_family_matches_transformers(family):
    overrides = dict(FAMILIES[family])
    model = tiny(overrides.pop("kind"), **overrides)
    ok, reason = supports(model)
    assert ok, reason
    tf = Transformer.from_hf(model)
    ids = random_ids(40)
    expected = hf_logits(model, ids)
    # whole prefill, chunked prefill (uneven chunks, each longer than a window), a verify of 5, decode steps
    for pieces in ([40], [13, 9, 11], [20, 5]):
        got = own_logits_in_pieces(tf, ids, pieces)
        assert (got - expected).abs().max().item() < TOL, (family, pieces)


@pytest.mark.parametrize("family", ["llama", "qwen2_sliding_layers", "mistral_sliding"])
def test_last_logits_and_no_logits_run_the_last_layer_on_fewer_rows(family):
    """logits="last" runs the last layer's attention and MLP on the last token only, logits=None not at all:
    same logits, same K/V as computing every row."""
    overrides = dict(FAMILIES[family])
    model = tiny(overrides.pop("kind"), **overrides)
    tf = Transformer.from_hf(model)
    ids = random_ids(30)
    expected = hf_logits(model, ids)
    every, last, none = new_buffer(tf), new_buffer(tf), new_buffer(tf)
    every.extend(ids[:20], tf, logits="all")
    got = last.extend(ids[:20], tf, logits="last").logits
    assert none.extend(ids[:20], tf, logits=None).logits is None
    assert (got[0] - expected[19]).abs().max().item() < TOL
    got = last.extend(ids[20:], tf, logits="last").logits  # a chunk after a prefix
    none.extend(ids[20:], tf, logits=None)
    every.extend(ids[20:], tf, logits="all")
    assert (got[0] - expected[29]).abs().max().item() < TOL
    assert torch.allclose(last.kv[:, :, :, :30], every.kv[:, :, :, :30], atol=1e-6)
    assert torch.allclose(none.kv[:, :, :, :30], every.kv[:, :, :, :30], atol=1e-6)


def test_yarn_scaling_is_applied():
    model = tiny("llama", rope_parameters=FAMILIES["yarn_rope"]["rope_parameters"])
    assert model.model.rotary_emb.attention_scaling != 1.0
    assert Transformer.from_hf(model).config.rope_scaling == model.model.rotary_emb.attention_scaling


def test_sliding_windows_per_layer():
    qwen = Transformer.from_hf(tiny("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1))
    assert qwen.config.sliding_windows == (None, 6, 6)
    assert Transformer.from_hf(tiny("qwen2")).config.sliding_windows == (None, None, None)
    assert Transformer.from_hf(tiny("mistral", sliding_window=7)).config.sliding_windows == (7, 7, 7)


@pytest.mark.parametrize("fields, error", [
    (dict(caches=[], starts=[]), "at least one row"),
    (dict(caches=["a"], starts=[0, 1], ids=torch.zeros(1, 2, dtype=torch.long)), "one non-negative position per row"),
    (dict(caches=["a"], starts=[-1], ids=torch.zeros(1, 2, dtype=torch.long)), "non-negative"),
    (dict(caches=["a", "b"], starts=[0, 0], ids=torch.zeros(1, 2, dtype=torch.long)), r"\[rows, width\]"),
    (dict(caches=["a"], starts=[0]), "needs its rows' lengths"),
    (dict(caches=["a", "b"], starts=[0, 0], lengths=[2, 1], ids=torch.zeros(2, 3, dtype=torch.long)), "the longest row is the width"),
    (dict(caches=["a"], starts=[0], lengths=[0]), "length >= 1"),
    (dict(caches=["a"], starts=[0], lengths=[1], logits="every"), "must be 'last', 'all' or None"),
    (dict(caches=["a"], starts=[0], lengths=[1], logits="last", logit_rows=[0]), "logit_rows picks rows of logits='all'"),
    (dict(caches=["a"], starts=[0], lengths=[1], logits="all", logit_rows=[1]), "outside the 1 rows"),
])
def test_a_batch_is_valid_by_construction(fields, error):
    """A forward's description is checked once, where it is built, with an error naming the field
    (before models/batch.py the forward took ten keywords whose combinations only asserts checked)."""
    with pytest.raises(ValueError, match=error):
        Batch(**fields)


def test_a_batch_normalises_its_rows():
    batch = Batch(caches=["a"], starts=[3], ids=torch.tensor([5, 6, 7]))  # one row may come as [S]
    assert batch.ids.shape == (1, 3) and batch.lengths == (3,) and batch.width == 3 and not batch.ragged
    ragged = Batch(caches=["a", "b"], starts=[0, 4], lengths=[1, 2], logits="all", logit_rows=range(1, 2))
    assert ragged.ragged and ragged.width == 2 and ragged.logit_rows == (1,) and ragged.ids is None


def test_the_forward_asserts_capacity_it_does_not_grow_the_cache():
    """The cache's owner makes room (KVBuffer.reserve, which extend calls); the forward only asserts it.
    Before, the forward grew the cache itself: this call then passed and resized a cache it does not own."""
    tf = Transformer.from_hf(tiny("llama"))
    buffer = new_buffer(tf)
    with pytest.raises(AssertionError, match="reserve"):
        tf(caches=[buffer], starts=[0], ids=torch.tensor([random_ids(4)]))
    assert buffer.capacity == 0


def test_attention_span():
    assert attention_span(0, 5, None, "cpu") == (0, None, True)
    assert attention_span(9, 1, None, "cpu") == (0, None, False)
    assert attention_span(9, 1, 4, "cpu") == (6, None, False)  # positions 6..9: the last 4, itself included
    low, mask, causal = attention_span(8, 3, 4, "cpu")
    assert low == 5 and not causal
    assert mask.tolist() == [  # keys at slots 5..10, queries at 8, 9, 10
        [True, True, True, True, False, False],
        [False, True, True, True, True, False],
        [False, False, True, True, True, True],
    ]


def test_supports_refuses_what_it_cannot_run():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    assert supports(tiny("llama"))[0]
    dynamic = tiny("llama", rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    ok, reason = supports(dynamic)
    assert not ok and "dynamic" in reason
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96))
    ok, reason = supports(neox)
    assert not ok and "gpt_neox" in reason
    with pytest.raises(ValueError, match="gpt_neox"):
        Transformer.from_hf(neox)


def test_from_hf_leaves_the_hf_model_as_it_was():
    """from_hf copies the weights into its own layout: the transformers model keeps its parameters,
    values and logits (the oracle of every test here must not change under it)."""
    model = tiny("qwen2")
    ids = random_ids(20)
    before = hf_logits(model, ids)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    tf = Transformer.from_hf(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() != tf.layers[0].wqkv.data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    assert torch.equal(hf_logits(model, ids), before)
    assert (own_logits_in_pieces(tf, ids, [20]) - before).abs().max().item() < TOL


def test_linear_matches_nn_linear_for_any_number_of_rows():
    from rotary.models.transformer import linear

    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)  # nn.Linear's [out, in]
    for shape in ((1, 64), (1, 1, 64), (2, 64), (3, 1, 64), (5, 7, 64)):
        x = torch.randn(*shape)
        expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
        got = linear(x, weight.t().contiguous(), bias)
        assert got.shape == expected.shape and (got.double() - expected).abs().max().item() < 1e-5
    odd, w = torch.randn(1, 60), torch.randn(60, 8)  # an inner size that does not split in 8: one plain product
    assert torch.allclose(linear(odd, w), odd @ w, atol=1e-5)


def cached_documents(model, tf: Transformer, sizes, held_back: int, forward=None):
    """Random documents of these sizes, transformers' logits for each, and caches holding all but
    their last `held_back` tokens (encoded by `forward`, default the own one)."""
    docs = [random_ids(n, seed=n) for n in sizes]
    alone = [hf_logits(model, d) for d in docs]
    buffers = [new_buffer(tf) for _ in docs]
    for buffer, ids in zip(buffers, docs):
        buffer.extend(ids[:-held_back], forward or tf)
    return docs, alone, buffers


def test_batch_of_documents_equals_each_alone():
    model = tiny("mistral", sliding_window=9)
    tf = Transformer.from_hf(model)
    docs, alone, buffers = cached_documents(model, tf, (8, 17, 30), held_back=6)
    taken = [len(d) - 6 for d in docs]
    # batched steps of one token each, then rows of 2, 1 and 3 tokens (right-padded), logits for all
    for counts in ([1, 1, 1], [1, 1, 1], [2, 1, 3]):
        rows = [d[t : t + n] for d, t, n in zip(docs, taken, counts)]
        out = extend_batch(buffers, rows, tf, logits="all")
        for b, n in enumerate(counts):
            assert (out.logits[b, :n] - alone[b][taken[b] : taken[b] + n]).abs().max().item() < TOL
        taken = [t + n for t, n in zip(taken, counts)]
    assert [b.length for b in buffers] == taken and all(b.is_complete() for b in buffers)
    # logits="last" picks each row's last real token
    out = extend_batch(buffers, [d[t:] for d, t in zip(docs, taken)], tf, logits="last")
    for b in range(3):
        assert (out.logits[b] - alone[b][-1]).abs().max().item() < TOL
    assert [b.token_ids for b in buffers] == [tuple(d) for d in docs]


@pytest.mark.parametrize("path", ["own", "hf"])
def test_deferred_encoding_riding_with_decoding_rows_gives_each_document_its_own_logits(path):
    """Deferred calls (a re-encoding in the middle of one document, none in another) run as rows of the
    decoding forward; every decoding row's logits still equal transformers' on its whole document, so
    the rows saw the re-encoded K/V, and only the decoding rows got logits. The same through the
    transformers fallback (models/hf.py), which a Llama-family model takes with ROTARY_FORWARD=hf."""
    from rotary.models.hf import HFForward

    model = tiny("llama")  # no window: every decoding row attends to the re-encoded slots
    tf = Transformer.from_hf(model)
    forward = tf if path == "own" else HFForward(model)
    docs, alone, buffers = cached_documents(model, tf, (12, 25, 31), held_back=3, forward=forward)
    with torch.inference_mode():
        buffers[1].kv[:, :, :, 5:14] = 7.0  # wrong K/V, which the deferred re-encoding must replace
        buffers[2].kv[:, :, :, 20:22] = -3.0
    deferred = [DeferredForward(), DeferredForward()]
    buffers[1].refresh(5, 9, deferred[0])
    buffers[1].refresh(9, 14, deferred[0])  # two calls of one document, going forward
    buffers[2].refresh(20, 22, deferred[1])
    rows = [d[-3:-1] for d in docs]
    out = extend_batch(buffers, rows, forward, logits="all", writes=writes_of(deferred))
    assert out.logits.shape[:2] == (3, 2)
    for b, d in enumerate(docs):
        assert (out.logits[b] - alone[b][len(d) - 3 : len(d) - 1]).abs().max().item() < TOL, b
    assert all(not d.calls for d in deferred)


def test_layer_slice_then_the_rest_equals_the_whole():
    model = tiny("llama", num_hidden_layers=4)
    tf = Transformer.from_hf(model)
    ids = random_ids(12)
    whole_buffer, split_buffer = new_buffer(tf), new_buffer(tf)
    whole = whole_buffer.extend(ids, tf.slice(range(0, 4)), logits="all")
    first = split_buffer.extend(ids, tf.slice(range(0, 2)), layers=range(0, 2), logits=None)
    assert split_buffer.filled == [12, 12, 0, 0] and split_buffer.length == 12
    rest = split_buffer.fill(12, tf.slice(range(2, 4), first.hidden), range(2, 4), logits="all")
    assert split_buffer.is_complete()
    assert torch.allclose(rest.logits, whole.logits, atol=1e-6) and torch.allclose(rest.hidden, whole.hidden, atol=1e-6)
    assert torch.allclose(split_buffer.kv[:, :, :, :12], whole_buffer.kv[:, :, :, :12], atol=1e-6)


def test_early_exit_leaves_later_layers_to_fill():
    model = tiny("llama", num_hidden_layers=4)
    tf = Transformer.from_hf(model)
    ids = random_ids(10)
    expected = hf_logits(model, ids)
    buffer = new_buffer(tf)
    buffer.extend(ids[:8], tf)
    exited = buffer.extend([ids[8]], tf.slice(range(0, 1)), layers=range(0, 1), logits="last")
    assert exited.logits.shape == (1, 97)  # the exit's own guess: final norm + head after layer 0
    assert buffer.filled == [9, 8, 8, 8] and buffer.unfilled(1) == (8, 9) and not buffer.is_complete()
    with pytest.raises(AssertionError, match="fill"):
        buffer.extend([ids[9]], tf)
    buffer.fill(1, tf.slice(range(1, 4), exited.hidden), range(1, 4))
    assert buffer.is_complete()
    out = buffer.extend([ids[9]], tf)
    assert (out.logits[0] - expected[9]).abs().max().item() < TOL


def test_rollback_then_extend_equals_never_extending():
    model = tiny("qwen2")
    tf = Transformer.from_hf(model)
    ids = random_ids(30)
    draft = random_ids(6, seed=7)
    expected = hf_logits(model, ids)
    buffer = new_buffer(tf)
    buffer.extend(ids[:20], tf)
    buffer.extend(draft, tf, logits="all")  # a rejected draft
    buffer.rollback(20)
    assert buffer.token_ids == tuple(ids[:20]) and buffer.filled == [20] * 3
    got = buffer.extend(ids[20:], tf, logits="all").logits[0]
    assert (got - expected[20:]).abs().max().item() < TOL


def test_apply_plan_moves_and_rerotates_then_refresh_is_exact():
    """PIE on the buffer: after an insertion, layer-0 K/V equal a full recompute; after refresh, all layers do."""
    from rotary.cache.plan import plan_update

    model = tiny("llama")
    tf = Transformer.from_hf(model)
    old = random_ids(40, seed=3)
    new = old[:10] + [5, 6, 7] + old[10:30] + old[33:]  # insert 3, delete 3
    buffer = new_buffer(tf)
    buffer.extend(old, tf)
    plan = plan_update(old, new)
    assert plan.tokens_rerotated > 0
    buffer.apply(plan, new, tf, inv_freq=tf.inv_freq)
    assert buffer.token_ids == tuple(new) and buffer.is_complete() and buffer.tokens.stale_count > 0
    scratch = new_buffer(tf)
    scratch.extend(new, tf)
    n = len(new)
    assert torch.allclose(buffer.kv[0, :, :, :n], scratch.kv[0, :, :, :n], atol=1e-5)
    assert not torch.allclose(buffer.kv[2, :, :, :n], scratch.kv[2, :, :, :n], atol=1e-3)  # stale above layer 0
    buffer.refresh(plan.stale_from, None, tf)
    assert buffer.tokens.stale_count == 0
    assert torch.allclose(buffer.kv[:, :, :, :n], scratch.kv[:, :, :, :n], atol=1e-5)


# ---------------------------------------------------------------------------
# The real embedded model


@pytest.fixture
def one_thread():
    """Real-model tests on one thread: on a small shared machine, OpenMP threads waiting on busy cores
    make a 2-thread run many times slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def real():
    """(own Transformer via Rotary's loader, plain transformers oracle loaded independently, tokenizer).

    The session's objects (tests/conftest.py): the runner's own forward, and the reference model."""
    from tests.conftest import reference_model, rotary_transformer

    oracle, tokenizer = reference_model()
    return rotary_transformer(), oracle, tokenizer


PROMPT_FILES = ("json/decoder.py", "textwrap.py", "shlex.py", "fnmatch.py", "string.py", "bisect.py")


def code_prompts(count: int = 5, tokens: int = 400) -> list[list[int]]:
    """Real code: the start of a few standard-library modules, cut inside a function body."""
    from tests.conftest import reference_tokenizer

    tokenizer = reference_tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts = []
    for name in PROMPT_FILES[:count]:
        text = (stdlib / name).read_text()
        ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
        prompts.append(ids)
    return prompts


@pytest.mark.model
def test_real_model_prefill_chunked_prefill_verify_and_decode(one_thread):
    tf, oracle, _ = real()
    ids = code_prompts(1, 420)[0]
    expected = hf_logits(oracle, ids)  # [420, vocab]
    # prefill of 400 (logits for all), verify of 8, then 12 decode steps
    got = own_logits_in_pieces(tf, ids, [400, 8])
    assert (got - expected).abs().max().item() < TOL
    # chunked prefill in uneven pieces
    got = own_logits_in_pieces(tf, ids, [128, 100, 172, 20])
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.model
def test_real_model_greedy_equals_transformers_generate(one_thread):
    tf, oracle, tokenizer = real()
    for ids in code_prompts(4, 250):
        with torch.inference_mode():
            expected = oracle.generate(
                torch.tensor([ids]), max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )[0, len(ids) :].tolist()
        buffer = new_buffer(tf)
        out = buffer.extend(ids, tf)
        got = []
        for _ in range(len(expected)):
            got.append(int(out.logits[0].argmax()))
            out = buffer.extend([got[-1]], tf)
        assert got == expected, tokenizer.decode(ids[-30:])


@pytest.mark.model
def test_real_model_batched_decode_equals_each_alone(one_thread):
    tf, _, _ = real()
    prompts = [ids[:n] for ids, n in zip(code_prompts(3, 300), (300, 170, 60))]
    alone = []
    for ids in prompts:
        buffer = new_buffer(tf)
        out, steps = buffer.extend(ids, tf), []
        for _ in range(6):
            steps.append(out.logits[0])
            out = buffer.extend([int(out.logits[0].argmax())], tf)
        alone.append(steps)
    buffers = [new_buffer(tf) for _ in prompts]
    logits = [b.extend(ids, tf).logits[0] for b, ids in zip(buffers, prompts)]
    for step in range(6):
        for b in range(len(prompts)):
            assert (logits[b] - alone[b][step]).abs().max().item() < TOL
        out = extend_batch(buffers, [[int(row.argmax())] for row in logits], tf)
        logits = list(out.logits)


@pytest.mark.model
def test_the_real_model_prompts_are_real_code_of_the_length_asked():
    """The real-model tests above feed `code_prompts`: each prompt must be the start of its standard-library
    file, exactly as long as asked, and the prompts must differ (a short or missing file would quietly make
    the logits and greedy checks weaker). Fails when a file gives fewer tokens than asked: checked with
    (5, 2000), which fnmatch.py (1,548 tokens) cannot give."""
    from tests.conftest import reference_tokenizer

    tokenizer = reference_tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for count, tokens in ((5, 420), (4, 250), (3, 300), (1, 420)):
        prompts = code_prompts(count, tokens)
        assert len(prompts) == count and all(len(ids) == tokens for ids in prompts), [len(ids) for ids in prompts]
        assert len({tuple(ids) for ids in prompts}) == count
        for name, ids in zip(PROMPT_FILES, prompts):
            text = (stdlib / name).read_text()
            assert text.startswith(tokenizer.decode(ids, clean_up_tokenization_spaces=False)), name
