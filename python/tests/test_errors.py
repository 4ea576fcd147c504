"""Bad input raises before anything runs, naming the argument; the library's own rejections come through with
its message. Among them the three mistakes that returned OK with wrong results through hand-written ctypes
(issue 20): int64 token ids, a float32 buffer taken as bf16, a non-contiguous `[:, :V]` view."""
import numpy as np
import pytest
import torch

import specdec_kernels as sk
import specdec_kernels.ops

V = 32


def chain_inputs(num_requests=2, drafts=3):
    offsets = torch.arange(0, (num_requests + 1) * drafts, drafts, dtype=torch.int32)
    tokens = torch.zeros(num_requests * drafts, dtype=torch.int32)
    logits = torch.randn(num_requests * (drafts + 1), V)
    return logits, tokens, offsets


def test_int64_token_ids_are_rejected_naming_the_argument():
    logits, tokens, offsets = chain_inputs()
    with pytest.raises(TypeError, match=r"^draft_tokens: dtype int64, expected int32"):
        sk.greedy_verify(logits, tokens.long(), offsets)
    with pytest.raises(TypeError, match=r"^draft_offsets: dtype int64"):
        sk.rejection_verify_chain(logits, tokens, offsets.long(), seeds=1, steps=0)
    with pytest.raises(TypeError, match=r"^draft_tokens: dtype int64"):
        sk.greedy_verify(logits.numpy(), tokens.long().numpy(), offsets.numpy())


def test_a_buffer_is_read_as_its_own_dtype_never_a_declared_one():
    """There is no dtype argument to get wrong: a float32 tensor is read as float32. Bits that only a
    declaration could call bf16 (uint16) are refused, and the draft rows must match the target's dtype."""
    logits, tokens, offsets = chain_inputs()
    as_f32 = sk.greedy_verify(logits, tokens, offsets)
    as_bf16 = sk.greedy_verify(logits.to(torch.bfloat16), tokens, offsets)
    # float32 logits verified as float32: the argmax of the float32 rows.
    assert as_f32.emitted_tokens[:, 0].tolist() == logits[[0, 4]].argmax(dim=1).tolist()
    assert as_bf16.request_status.tolist() == [0, 0]
    with pytest.raises(TypeError, match=r"^logits: dtype uint16, expected .*ml_dtypes.bfloat16"):
        sk.greedy_verify(logits.to(torch.bfloat16).view(torch.uint16).numpy(), tokens.numpy(), offsets.numpy())
    draft = torch.randn(tokens.shape[0], V, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"^draft: dtype bfloat16 while target is float32"):
        sk.rejection_verify_chain(logits, tokens, offsets, draft=draft, seeds=1, steps=0)
    with pytest.raises(TypeError, match=r"^target: dtype bfloat16, expected float32"):
        sk.rejection_verify_chain(logits.to(torch.bfloat16), tokens, offsets, probabilities=True, seeds=1, steps=0)


def test_a_non_contiguous_view_is_rejected_naming_the_argument():
    logits, tokens, offsets = chain_inputs()
    padded = torch.randn(logits.shape[0], V + 7)
    with pytest.raises(ValueError, match=r"^logits: not contiguous .*contiguous\(\)"):
        sk.greedy_verify(padded[:, :V], tokens, offsets)
    with pytest.raises(ValueError, match=r"^target: not contiguous"):
        sk.rejection_verify_chain(padded[:, :V], tokens, offsets, seeds=1, steps=0)
    with pytest.raises(ValueError, match=r"^logits: not C-contiguous"):
        sk.greedy_verify(padded.numpy()[:, :V], tokens.numpy(), offsets.numpy())
    with pytest.raises(ValueError, match=r"^draft_tokens: not contiguous"):
        sk.greedy_verify(logits, torch.zeros(12, dtype=torch.int32)[::2], offsets)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda l, t, o: sk.greedy_verify([[0.0]], t, o), TypeError, r"^logits: expected a torch.Tensor"),
        (lambda l, t, o: sk.greedy_verify(l[:-1], t, o), ValueError, r"^logits: 7 rows, expected 8"),
        (lambda l, t, o: sk.greedy_verify(l.double(), t, o), TypeError, r"^logits: dtype float64"),
        (lambda l, t, o: sk.greedy_verify(l.reshape(-1), t, o), ValueError, r"^logits: 1 dimensions"),
        (lambda l, t, o: sk.greedy_verify(l, t, o[:0]), ValueError, r"^draft_offsets: empty"),
        (lambda l, t, o: sk.greedy_verify(l, t, o, emit_width=0), ValueError, r"^emit_width: 0"),
        (lambda l, t, o: sk.greedy_verify(l, t.numpy(), o), TypeError, r"^draft_tokens: a numpy array while"),
        (lambda l, t, o: sk.greedy_verify(l.requires_grad_(), t, o), ValueError, r"^logits: requires grad"),
        (lambda l, t, o: sk.rejection_verify_chain(l, t, o, seeds=1, steps=[0]), ValueError,
         r"^steps: shape \(1,\), expected \(2,\)"),
        (lambda l, t, o: sk.rejection_verify_chain(l, t, o, steps=0, seeds=None), ValueError, r"^seeds: required"),
        (lambda l, t, o: sk.rejection_verify_chain(l, t, o, seeds=1, steps=0, top_k=torch.ones(2)), TypeError,
         r"^top_k: dtype float32, expected int32"),
        (lambda l, t, o: sk.rejection_verify_chain(l.softmax(-1), t, o, probabilities=True, temperature=1.0,
                                                   seeds=1, steps=0), ValueError,
         r"^temperature: given with probabilities=True"),
        (lambda l, t, o: sk.rejection_verify_chain(l, t, o, draft_temperature=1.0, seeds=1, steps=0), ValueError,
         r"^draft_temperature: given without draft rows"),
        (lambda l, t, o: sk.rejection_verify_chain(l, t, o, draft=torch.randn(6, V + 1), seeds=1, steps=0),
         ValueError, r"^draft: shape \(6, 33\), expected \(6, 32\)"),
        (lambda l, t, o: sk.rejection_verify_tree(l[:6], t, t[:5], o, seeds=1, steps=0), ValueError,
         r"^parents: shape \(5,\), expected \(6,\)"),
    ],
)
def test_bad_arguments_are_named(call, error, message):
    logits, tokens, offsets = chain_inputs()
    with pytest.raises(error, match=message):
        call(logits, tokens, offsets)


def test_the_librarys_rejection_comes_through_with_its_message():
    weights = torch.randn(24, 128, dtype=torch.bfloat16)  # n must be a multiple of 16
    with pytest.raises(sk.InvalidArgumentError, match=r"SPECDEC_INVALID_ARGUMENT: specdec_int4_quantize: .*\bn\b"):
        sk.int4_quantize(weights, group_size=64)


def test_a_bad_request_is_flagged_alone_and_named_by_raise_for_status():
    logits, tokens, offsets = chain_inputs()
    tokens[4] = V + 3  # request 1 drafts a token outside the vocabulary
    result = sk.rejection_verify_chain(logits, tokens, offsets, seeds=[1, 2], steps=0)
    assert result.request_status.tolist() == [0, 6]
    assert sk.request_status_name(6) == "SPECDEC_REQUEST_DRAFT_TOKEN"
    assert result.accepted_counts[1].item() == -1 and result.accepted_counts[0].item() >= 0
    with pytest.raises(ValueError, match=r"^request 1: SPECDEC_REQUEST_DRAFT_TOKEN"):
        result.raise_for_status()
    good = sk.greedy_verify(logits, torch.zeros_like(tokens), offsets)
    assert good.raise_for_status() is good


def test_a_temperature_out_of_range_is_flagged_by_the_library():
    logits, tokens, offsets = chain_inputs()
    result = sk.rejection_verify_chain(logits, tokens, offsets, seeds=1, steps=0, temperature=[1.0, -2.0])
    assert result.request_status.tolist() == [0, 8]  # SPECDEC_REQUEST_SAMPLING_PARAMS


def test_int4_arguments_are_named():
    w = sk.int4_quantize(torch.randn(32, 128, dtype=torch.float16), group_size=64)
    with pytest.raises(ValueError, match=r"^group_size: 100"):
        sk.int4_quantize(torch.randn(32, 128, dtype=torch.float16), group_size=100)
    with pytest.raises(TypeError, match=r"^weights: dtype float32, expected float16 or bfloat16"):
        sk.int4_quantize(torch.randn(32, 128), group_size=64)
    with pytest.raises(ValueError, match=r"^x: shape \(1, 64\), expected \(m, 128\)"):
        sk.int4_gemv(torch.randn(1, 64, dtype=torch.float16), w)
    with pytest.raises(ValueError, match=r"^packed: shape \(512,\), expected \(256,\)"):
        sk.ops.ensure_registered().int4_gemv(torch.randn(1, 64, dtype=torch.float16), w.packed, w.scales, w.zeros,
                                             32, 64)
    with pytest.raises(TypeError, match=r"^weight: expected an Int4Weight"):
        sk.int4_gemv(torch.randn(1, 128, dtype=torch.float16), (w.packed, w.scales, w.zeros))
    with pytest.raises(TypeError, match=r"^scale_dtype"):
        sk.int4_quantize(torch.randn(32, 128, dtype=torch.float16), group_size=64, scale_dtype=torch.float32)
    with pytest.raises(sk.InvalidArgumentError, match=r"\bm\b"):
        sk.int4_gemv(torch.randn(17, 128, dtype=torch.float16), w)


def test_numpy_without_ml_dtypes_names_the_fix():
    with pytest.raises(TypeError, match="ml_dtypes.bfloat16"):
        sk.int4_quantize(np.zeros((16, 64), np.uint16), group_size=64)


def test_review_findings_stay_fixed():
    """Each case a review found (a silent result, a numpy/torch difference or an unnamed error), kept fixed."""
    logits, tokens, offsets = chain_inputs()
    np_logits, np_tokens, np_offsets = logits.numpy(), tokens.numpy(), offsets.numpy()
    # A big-endian array would be read as little-endian bytes.
    with pytest.raises(ValueError, match=r"^logits: byte order '>f4'"):
        sk.greedy_verify(np_logits.astype(">f4"), np_tokens, np_offsets)
    # Broken offsets with the default emit_width: an error naming them, never a huge allocation.
    with pytest.raises(ValueError, match=r"^draft_offsets: request 0 spans 0..67108864"):
        sk.greedy_verify(np.zeros((1, 8), np.float32), np.zeros(0, np.int32), np.array([0, 2**26], np.int32))
    flagged = sk.greedy_verify(np.zeros((1, 8), np.float32), np.zeros(0, np.int32), np.array([0, 2**26], np.int32),
                               emit_width=np.int64(4))
    assert flagged.request_status.tolist() == [1]  # SPECDEC_REQUEST_OFFSETS
    # Per-request values: no silent coercion, and the argument named.
    for bad, error in (([[1], [2]], TypeError), (1.9, TypeError), (True, TypeError), ("12", TypeError)):
        with pytest.raises(error, match=r"^seeds: "):
            sk.rejection_verify_chain(logits, tokens, offsets, seeds=bad, steps=0)
    with pytest.raises(TypeError, match=r"^top_k: 2.7"):
        sk.rejection_verify_chain(logits, tokens, offsets, seeds=1, steps=0, top_k=2.7)
    for inputs in ((logits, tokens, offsets), (np_logits, np_tokens, np_offsets)):
        with pytest.raises(OverflowError, match=r"^top_k: 1099511627776 does not fit in int32"):
            sk.rejection_verify_chain(*inputs, seeds=1, steps=0, top_k=2**40)
    with pytest.raises(TypeError, match=r"^top_k: dtype int64, expected int32 \(convert with"):
        sk.rejection_verify_chain(logits, tokens, offsets, seeds=1, steps=0, top_k=torch.ones(2, dtype=torch.int64))
    # 64-bit seeds: negative ints are their two's-complement bits, everywhere.
    assert sk.sample_seed(-1, 0) == sk.sample_seed(2**64 - 1, 0)
    with pytest.raises(OverflowError, match=r"^base_seed: "):
        sk.sample_seed(2**64, 0)
    # Layouts the library cannot read.
    with pytest.raises(ValueError, match=r"^logits: torch.sparse_coo layout"):
        sk.greedy_verify(logits.to_sparse(), tokens, offsets)


def test_no_drafts_with_draft_rows_means_the_same_on_numpy_and_torch():
    """T = 0 (nobody drafted) with empty draft rows and the drafter's temperature: the rows are never read; an
    empty torch tensor (no data pointer) and an empty numpy array behave alike."""
    target = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    tokens, offsets = np.zeros(0, np.int32), np.zeros(3, np.int32)
    a = sk.rejection_verify_chain(target, tokens, offsets, draft=np.zeros((0, 8), np.float32), draft_temperature=0.5,
                                  seeds=[1, 2], steps=0)
    b = sk.rejection_verify_chain(torch.from_numpy(target), torch.from_numpy(tokens), torch.from_numpy(offsets),
                                  draft=torch.zeros(0, 8), draft_temperature=0.5, seeds=[1, 2], steps=0)
    np.testing.assert_array_equal(a.emitted_tokens, b.emitted_tokens.numpy())
    assert a.request_status.tolist() == [0, 0]


def test_int4_review_findings_stay_fixed():
    w = torch.randn(32, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"^group_size: 64.0"):
        sk.int4_quantize(w, group_size=64.0)
    from_numpy_dtype = sk.int4_quantize(w.numpy(), group_size=64, scale_dtype=np.float16)
    assert from_numpy_dtype.scales.dtype == np.float16
    weight = sk.int4_quantize(w.numpy(), group_size=64)
    with pytest.raises(TypeError, match=r"^weight.packed: a numpy array while x is a torch tensor"):
        sk.int4_gemv(torch.randn(1, 128, dtype=torch.float16), weight)
    with pytest.raises(TypeError, match=r"^scale_dtype: "):
        specdec_kernels.ops.ensure_registered().int4_quantize(w, 64, torch.float32)
    with pytest.raises(TypeError, match=r"^weights: None"):
        specdec_kernels.ops.ensure_registered().int4_quantize(None, 64, torch.float16)
    with pytest.raises(TypeError, match=r"^parents: None"):
        specdec_kernels.ops.ensure_registered().rejection_verify_tree(
            torch.randn(2, 8), None, torch.zeros(2, dtype=torch.int32), None, torch.tensor([0, 2], dtype=torch.int32),
            torch.ones(1), None, None, torch.ones(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), None,
            None, None, False, 3)
