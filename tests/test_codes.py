"""The one code format: packing, distances, prefix lengths and the two ranking orders."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbir.codes import (
    CodeLayout,
    Codes,
    class_bits_for,
    common_prefix_length,
    hamming_distance,
    lex_order,
    pack_bits,
    rank,
)


def bits_arrays(max_n=12, max_b=70):
    return st.integers(1, max_b).flatmap(
        lambda b: st.integers(0, max_n).flatmap(
            lambda n: st.lists(st.lists(st.integers(0, 1), min_size=b, max_size=b), min_size=n, max_size=n).map(
                lambda rows: np.array(rows, dtype=np.uint8).reshape(n, b)
            )
        )
    )


def test_bit_zero_is_msb_of_byte_zero():
    bits = np.zeros((1, 12), np.uint8)
    bits[0, 0] = 1
    bits[0, 9] = 1
    c = Codes.from_bits(bits)
    assert c.packed.tolist() == [[0b10000000, 0b01000000]]
    assert c.to_hex() == ["8040"]


@settings(max_examples=60, deadline=None)
@given(bits_arrays())
def test_pack_unpack_roundtrip_and_zero_padding(bits):
    c = Codes.from_bits(bits)
    assert c.packed.shape == (bits.shape[0], (bits.shape[1] + 7) // 8)
    np.testing.assert_array_equal(c.to_bits(), bits)
    # pad bits are zero: re-expanding the whole bytes gives zeros after B
    full = np.unpackbits(c.packed, axis=1, bitorder="big")
    assert not full[:, bits.shape[1] :].any()
    assert Codes.from_hex(c.to_hex(), c.nbits) == c
    assert Codes.from_bytes(c.to_bytes_list(), c.nbits) == c


def test_nonzero_pad_bits_rejected():
    with pytest.raises(ValueError, match="pad bits"):
        Codes(np.array([[0xFF]], np.uint8), 7)
    with pytest.raises(ValueError, match="uint8"):
        Codes(np.zeros((1, 1), np.int32), 8)
    with pytest.raises(ValueError, match="0/1"):
        pack_bits(np.array([[0, 2]]))


def _brute_xor_int(q_bits, c_bits):
    return int("".join(str(int(a) ^ int(b)) for a, b in zip(q_bits, c_bits)), 2)


@settings(max_examples=60, deadline=None)
@given(bits_arrays(max_n=10, max_b=20), st.integers(0, 2**20))
def test_distances_and_prefix_match_brute_force(bits, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2, size=(3, bits.shape[1]), dtype=np.uint8)
    qc, dc = Codes.from_bits(q), Codes.from_bits(bits)
    ham = hamming_distance(qc, dc)
    cpl = common_prefix_length(qc, dc)
    for i in range(3):
        for j in range(len(bits)):
            assert ham[i, j] == int((q[i] != bits[j]).sum())
            diff = np.flatnonzero(q[i] != bits[j])
            assert cpl[i, j] == (diff[0] if len(diff) else bits.shape[1])


@settings(max_examples=80, deadline=None)
@given(bits_arrays(max_n=14, max_b=70), st.integers(0, 2**20), st.sampled_from(["lex", "hamming"]))
def test_rank_equals_brute_force_sort_with_ties(bits, seed, order):
    rng = np.random.default_rng(seed)
    n, b = bits.shape
    if n:  # force duplicate codes (ties) half of the time
        bits = bits[rng.integers(0, n, size=n)] if seed % 2 else bits
    q = rng.integers(0, 2, size=(2, b), dtype=np.uint8)
    ids = rng.permutation(1000)[:n]
    got = rank(Codes.from_bits(q), Codes.from_bits(bits), order=order, ids=ids)
    for i in range(2):

        def key(j, i=i):
            x = _brute_xor_int(q[i], bits[j])
            ham = int((q[i] != bits[j]).sum())
            return (ham, x, ids[j]) if order == "hamming" else (x, ids[j])

        expect = sorted(range(n), key=key)
        assert got[i].tolist() == expect


def test_rank_k_larger_than_n_and_empty_db():
    db = Codes.from_bits(np.array([[1, 0, 1], [0, 0, 1]]))
    q = Codes.from_bits(np.array([[0, 0, 0]]))
    assert rank(q, db, k=10).shape == (1, 2)
    assert rank(q, Codes.empty(3), k=5).shape == (1, 0)
    with pytest.raises(ValueError):
        rank(q, Codes.empty(4))


def test_lex_order_is_integer_order_then_id():
    bits = np.array([[1, 1], [0, 1], [0, 1], [0, 0]])
    assert lex_order(Codes.from_bits(bits), ids=np.array([9, 5, 2, 7])).tolist() == [3, 2, 1, 0]


def test_prefix_and_permute_and_uint64():
    c = Codes.from_bits(np.array([[1, 0, 1, 1, 0, 1, 1, 1, 1, 0]]))
    assert c.prefix(3).to_bits().tolist() == [[1, 0, 1]]
    assert c.prefix(3).packed.tolist() == [[0b10100000]]
    assert c.permute_bits([9, 8, 7, 6, 5, 4, 3, 2, 1, 0]).to_bits().tolist() == [[0, 1, 1, 1, 1, 0, 1, 1, 0, 1]]
    assert c.as_uint64()[0] == np.uint64(int("1011011110", 2) << 54)


def test_layout_roundtrip_and_validation():
    lay = CodeLayout(nbits=16, class_bits=4, depth=12, class_names=("a", "b"), method="ddtl")
    assert CodeLayout.from_json(lay.to_json()) == lay
    assert lay.free_bits == 0
    with pytest.raises(ValueError, match="exceed"):
        CodeLayout(nbits=8, class_bits=4, depth=12)
    with pytest.raises(ValueError, match="unknown"):
        CodeLayout.from_dict({"nbits": 8, "bogus": 1})
    assert [class_bits_for(m) for m in (2, 3, 4, 10, 16, 17)] == [1, 2, 2, 4, 4, 5]


def test_json_default_converts_numpy_paths_and_codes_and_names_what_it_cannot():
    import json
    from pathlib import Path

    from cbir.codes import json_default

    got = json.loads(
        json.dumps(
            {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "a": np.arange(2), "p": Path("/x")},
            default=json_default,
        )
    )
    assert got == {"i": 3, "f": 0.5, "b": True, "a": [0, 1], "p": "/x"}
    assert json.dumps(Codes.from_bits(np.array([[1, 0, 1]], np.uint8)), default=json_default) == '["a0"]'
    with pytest.raises(TypeError, match="object"):
        json.dumps({"x": object()}, default=json_default)
