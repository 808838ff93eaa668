import pytest
import torch

from svdq_compile.runtime import pack_int4, unpack_int4


def test_signed_roundtrip_all_values():
    q = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.cartesian_prod(q, q).reshape(-1)  # every (even, odd) nibble pair
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.numel() == q.numel() // 2
    assert torch.equal(unpack_int4(packed, signed=True), q)


def test_unsigned_roundtrip_all_values():
    q = torch.arange(0, 16, dtype=torch.int8)
    q = torch.cartesian_prod(q, q).reshape(-1)
    assert torch.equal(unpack_int4(pack_int4(q), signed=False), q)


def test_low_nibble_is_even_index():
    # ONNX order: element 0 in bits 0-3, element 1 in bits 4-7.
    packed = pack_int4(torch.tensor([1, 2], dtype=torch.int8))
    assert packed.item() == 0x21
    packed = pack_int4(torch.tensor([-1, 0], dtype=torch.int8))
    assert packed.item() == 0x0F


def test_batched_shapes():
    q = torch.randint(-8, 8, (3, 5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(TypeError, match="integer"):
        pack_int4(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[-8, 15\]"):
        pack_int4(torch.tensor([16, 0], dtype=torch.int16))
