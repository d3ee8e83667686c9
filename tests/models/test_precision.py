"""The precisions of the own forward (models/precision.py) against `exact`, within the bounds stated here.

Bounds, measured on the embedded model (SmolLM2-135M Q4_1; AVX2 and AVX-512 machines agree, the
kernels' arithmetic does not depend on the CPU's width):
- one product, relative error: fp16 < 1e-3 (measured 2-4e-4), int4 < PEER_DEVIATION = 5e-3
  (measured ~3e-3: bfloat16 activations and scales on the GGUF's exact 4-bit values);
- the last position's logits after 600-1000 tokens of real code, relative: fp16 < 5e-3, int4 < 4e-2
  (the errors of 30 layers add up: measured 0.7-2e-3 and 0.6-1.7e-2);
- greedy continuations of 6 tokens at 10 places in real code identical to exact's: fp16 at least 9 of
  10, int4 at least 8 of 10 (measured at 40 places: 40 and 40; bench decode reports the share as
  `results.own.agreement`).
"""

from __future__ import annotations

import pytest
import torch

from rotary.models.precision import PEER_DEVIATION, Fp16Weight, Int4Weight, choose, choose_once, deviation

pytestmark = pytest.mark.model


def product(weight, x):
    from rotary.models.transformer import linear

    return linear(x, weight)


def test_int4_from_q4_1_blocks_holds_the_blocks_values():
    """Q4_1 blocks (value = d * q + m) packed by Int4Weight multiply as the float values they stand for,
    within bfloat16's rounding of activations, scales and zeros (the bound: PEER_DEVIATION). A zero
    taken as m (not m + 8 d) or nibbles in another order fail it by orders of magnitude."""
    generator = torch.Generator().manual_seed(0)
    n, k = 192, 576
    q = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    d = torch.rand(n, k // 32, generator=generator) * 0.02 + 0.001
    m = -torch.rand(n, k // 32, generator=generator) * 0.1
    values = (d.repeat_interleave(32, dim=1) * q.float() + m.repeat_interleave(32, dim=1))  # [N, K]
    x = torch.randn(3, k, generator=generator)
    exact = x @ values.t()
    assert deviation(exact, Int4Weight(q, d, m).matmul(x)) < PEER_DEVIATION
    assert deviation(exact, Fp16Weight(values.t().contiguous()).matmul(x)) < 1e-3


def test_every_precision_stays_within_its_bound_on_the_real_model():
    """Logits after real code and greedy continuations: fp16 and int4 against exact (bounds above), on
    packed copies of the session's float32 model (precision.packed_copy, as auto measures them)."""
    from rotary.bench.corpus import python_files
    from rotary.cache.buffer import KVBuffer
    from rotary.models.precision import packed_copy
    from tests.conftest import rotary_model, rotary_runner

    loaded, runner = rotary_model(), rotary_runner()
    texts = [p.read_text(errors="replace") for p in python_files(None)[:10]]
    results = {}
    for precision in ("exact", "fp16", "int4"):
        model = loaded.model if precision == "exact" else packed_copy(loaded.model, precision, loaded.blocks)
        assert model.precision == precision
        config = model.config
        logits, continuations = None, []
        for i, text in enumerate(texts):
            ids = runner.encode_text(text)[: 600 if i == 0 else 120]
            buffer = KVBuffer(config.n_layers, config.n_kv_heads, config.head_dim, dtype=torch.float32, device="cpu")
            buffer.reserve(len(ids) + 16)
            out = buffer.extend(ids, model).logits[0]
            logits = out if i == 0 else logits
            tokens = []
            for _ in range(6):
                tokens.append(int(out.argmax()))
                out = buffer.extend([tokens[-1]], model).logits[0]
            continuations.append(tokens)
        results[precision] = (logits, continuations)
    exact_logits, exact_tokens = results["exact"]
    for precision, bound, agree in (("fp16", 5e-3, 9), ("int4", 4e-2, 8)):
        got_logits, got_tokens = results[precision]
        assert deviation(exact_logits, got_logits) < bound, precision
        same = sum(a == b for a, b in zip(got_tokens, exact_tokens))
        assert same >= agree, f"{precision}: {same} of 10 greedy continuations equal exact's"


def test_auto_takes_the_fastest_form_below_the_peers_deviation_and_says_so(tmp_path, monkeypatch):
    """choose measures every form on this machine; the one it takes is below PEER_DEVIATION and no
    slower than any other allowed; with a bound nothing else meets, it takes exact. choose_once keeps the
    answer: a second load does not measure again."""
    import rotary.models.precision as precision_module
    from tests.conftest import rotary_model, rotary_runner

    loaded, fingerprint = rotary_model(), rotary_runner().fingerprint
    model = loaded.model
    assert model.precision == "exact"  # the session's model: the test packs copies only (choose does)
    choice = choose(model, 1, loaded.blocks)
    allowed = {p: m for p, m in choice.measured.items() if m["deviation"] < PEER_DEVIATION}
    assert set(choice.measured) == {"exact", "fp16", "int4"} and choice.precision in allowed
    assert choice.measured[choice.precision]["step_ms"] == min(m["step_ms"] for m in allowed.values())
    assert choice.precision in choice.reason and "int4" in choice.reason
    monkeypatch.setattr(precision_module, "PEER_DEVIATION", 1e-9)
    assert choose(model, 1, loaded.blocks).precision == "exact"
    monkeypatch.undo()

    first = choose_once(model, 1, fingerprint, tmp_path, loaded.blocks)
    monkeypatch.setattr(precision_module, "choose", lambda *a, **k: pytest.fail("measured again"))
    again = choose_once(model, 1, fingerprint, tmp_path, loaded.blocks)
    assert again.precision == first.precision and "measured once on this machine" in again.reason
    assert model.precision == "exact" and isinstance(model.layers[0].wqkv, torch.Tensor)


def test_a_packed_model_is_not_packed_again():
    """Packing replaces float32 matrices: a second pack of a packed model (or a runner on it) is a clear
    error, not a product of packed weights packed again."""
    from rotary.models.precision import pack, packed_copy
    from rotary.models.runner import ModelRunner
    from tests.conftest import rotary_model

    loaded = rotary_model()
    fp16 = packed_copy(loaded.model, "fp16")
    with pytest.raises(ValueError, match="packed as fp16 already"):
        pack(fp16, "int4")
    import dataclasses

    with pytest.raises(ValueError, match="packed as fp16 already"):
        ModelRunner(dataclasses.replace(loaded, model=fp16), "exact")


def test_kv_snapshots_of_one_precision_are_not_those_of_another():
    """The K/V a precision computes differ from exact's: the runner's model identity (which names the
    store's snapshot folder and guards every snapshot it loads) differs per precision, exact's unchanged."""
    import dataclasses

    from rotary.models.precision import twin
    from rotary.models.runner import ModelRunner
    from tests.conftest import rotary_model, rotary_runner

    loaded = rotary_model()
    assert rotary_runner().info.identity == loaded.info.identity  # exact: as the loader named it
    identities = {ModelRunner(dataclasses.replace(loaded, model=twin(loaded.model)), p).info.identity for p in ("fp16", "int4")}
    assert len(identities) == 2 and loaded.info.identity not in identities


def test_a_worker_runs_the_precision_it_is_given_and_refuses_an_unknown_one():
    """`rotary worker --precision` and $ROTARY_PRECISION reach the model runner; a wrong value is a clear error."""
    from rotary.models.precision import requested

    assert requested("int4") == "int4"
    with pytest.raises(ValueError, match="precision must be one of exact, fp16, int4, auto"):
        requested("int3")


def test_the_worker_runs_the_precision_its_flag_names_and_its_stats_say_so(tmp_path):
    """`rotary worker --precision int4` (the flag wins over the suite's $ROTARY_PRECISION=exact): its
    Stats name the precision the model thread runs and why."""
    import json

    from rotary.completion.client import WorkerClient
    from rotary.completion.rpc import worker_pb2 as pb
    from tests.conftest import spawn_worker, stop

    proc, address = spawn_worker(tmp_path, "--precision", "int4")
    client = WorkerClient(address)
    try:
        client.wait_ready(timeout=300)
        stats = json.loads(client.stub.Stats(pb.StatsRequest()).json)
        assert stats["model_thread"]["precision"] == "int4"
        assert stats["model_thread"]["precision_reason"] == "asked for"
    finally:
        client.close()
        stop(proc)
