"""The counter-based generator behind DARE and DELLA masks: SplitMix64 by element index,
checked against an independent longhand in Python integers and a published test vector;
the same numbers whatever the chunking or the split of the indices."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lazymerge.meaning.methods import draws
from lazymerge.meaning.methods.draws import keep_mask, stream_key, uniforms

MOD = 2**64


def splitmix64(key: int, index: int) -> int:
    """SplitMix64's (index + 1)-th output from state `key`, in Python integers mod 2^64."""
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) % MOD
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % MOD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % MOD
    return z ^ (z >> 31)


def longhand(key: int, index: int) -> float:
    return (splitmix64(key, index) >> 40) / 2**24


def test_the_published_splitmix64_sequence() -> None:
    """Rosetta Code, "Pseudo-random numbers/Splitmix64": the first five outputs from
    state 1234567; a uniform is an output's top 24 bits."""
    published = [
        0x599ED017FB08FC85, 0x2C73F08458540FA5, 0x883EBCE5A3F27C77,
        0x3FBEF740E9177B3F, 0xE3B8346708CB5ECD,
    ]  # fmt: skip
    assert [splitmix64(1234567, i) for i in range(5)] == published
    assert uniforms(1234567, 0, 5).tolist() == [(z >> 40) / 2**24 for z in published]


def test_one_value_by_hand() -> None:
    # key 5, index 2: the third output of SplitMix64 from state 5, step by step mod 2^64
    z = (5 + 3 * 0x9E3779B97F4A7C15) % MOD
    assert z == 0xDAA66D2C7DDF7444
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % MOD
    assert z == 0xEE489A49C2F09A0D
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % MOD
    assert z == 0x3B92D3F0674E66A7
    z ^= z >> 31
    assert z == 0x3B92D3F0106BC147  # the top 24 bits, 0x3B92D3, are the uniform's
    assert uniforms(5, 2, 1).item() == 0x3B92D3 / 2**24 == longhand(5, 2)


@pytest.mark.parametrize("key", [0, 1, 2**63 - 1, stream_key(7, "model.norm.weight", 3)])
def test_torch_int64_matches_python_integers(key: int) -> None:
    """Wrapping int64 products and masked shifts give the unsigned arithmetic, at indices
    near 0, past 2^32 and near 2^63 (where index * GAMMA wraps many times)."""
    for start in (0, 2**32 - 3, 2**62 + 12345):
        got = uniforms(key, start, 300).tolist()
        assert got == [longhand(key, start + j) for j in range(300)]


def test_chunking_and_splits_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    key = stream_key(0, "model.layers.0.mlp.up_proj.weight", 1)
    whole = uniforms(key, 1000, 5000)
    monkeypatch.setattr(draws, "CHUNK", 7)
    assert torch.equal(uniforms(key, 1000, 5000), whole)
    parts = [uniforms(key, 1000, 1), uniforms(key, 1001, 2999), uniforms(key, 4000, 2000)]
    assert torch.equal(torch.cat(parts), whole)
    assert uniforms(key, 10, 0).shape == (0,)


def test_stream_key_is_a_stable_hash_of_seed_model_and_tensor() -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    key = stream_key(0, name, 1)
    assert key == 943327997071800292  # pinned: the docs tell people how to reproduce it
    text = f"0\0{1}\0{name}".encode()
    digest = hashlib.blake2b(text, digest_size=8, person=b"lazymerge-draws").digest()
    assert key == int.from_bytes(digest, "little") % 2**63
    keys = {
        key, stream_key(1, name, 1), stream_key(0, name, 2),
        stream_key(0, "model.layers.1.mlp.up_proj.weight", 1), stream_key(-1, name, 1),
    }  # fmt: skip
    assert len(keys) == 5 and all(0 <= k < 2**63 for k in keys)
    streams = {tuple(uniforms(k, 0, 8).tolist()) for k in keys}
    assert len(streams) == 5


def test_uniforms_are_multiples_of_2_to_the_minus_24_in_0_1_with_mean_one_half() -> None:
    u = uniforms(stream_key(3, "t", 0), 0, 1_000_000)
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.floor())
    assert abs(float(u.double().mean()) - 0.5) < 0.002
    counts = torch.histc(u, bins=10, min=0, max=1)  # each tenth holds about a tenth
    assert float((counts / 100_000 - 1).abs().max()) < 0.01


def test_keep_mask_keeps_a_share_p() -> None:
    key = stream_key(3, "model.layers.2.self_attn.q_proj.weight", 1)
    mask = keep_mask(key, 0, (1000, 1000), 0.3)
    assert mask.shape == (1000, 1000) and mask.dtype == torch.bool
    assert abs(float(mask.double().mean()) - 0.3) < 0.002
    assert torch.equal(mask.reshape(-1), uniforms(key, 0, 1_000_000) < 0.3)
    assert not keep_mask(key, 0, (4, 5), 0.0).any()
    assert keep_mask(key, 0, (4, 5), 1.0).all()


def test_keep_mask_takes_one_probability_per_element() -> None:
    """DELLA: probabilities per element, broadcast; the same numbers as a scalar p."""
    key = stream_key(0, "w", 1)
    p = torch.linspace(0.1, 0.5, 200)  # one per column
    mask = keep_mask(key, 600, (300, 200), p)
    assert torch.equal(mask, uniforms(key, 600, 60_000).view(300, 200) < p)
    share = mask.double().mean(0)
    assert float(share[:20].mean()) < 0.2 < 0.4 < float(share[-20:].mean())
    # a block of rows later in the tensor is the same slice of the whole mask
    whole = keep_mask(key, 0, (400, 200), p)
    assert torch.equal(whole[3:303], mask)


EDGES = [0.5, 0.3, 0.0, -0.25, 1.0, 1.5, 2**-24, 2**-25, 3 * 2**-24, 1 - 2**-24, 1 - 2**-26]


@pytest.mark.parametrize("p", [*EDGES, float("nan")])
def test_a_scalar_probability_compares_as_integers_alike(
    p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python float p takes the integer comparison (top 24 bits against ceil(p * 2^24));
    it keeps exactly where the longhand's uniform is below p rounded to float32, and where
    a tensor p keeps, at indices near 0, past 2^32 and near 2^63, in any chunking."""
    key = stream_key(5, "model.layers.1.mlp.down_proj.weight", 2)
    p32 = float(torch.tensor(p, dtype=torch.float32))
    for start in (0, 2**32 - 3, 2**62 + 12345):
        got = keep_mask(key, start, (3, 100), p)
        assert got.dtype == torch.bool and got.shape == (3, 100)
        expected = [longhand(key, start + j) < p32 for j in range(300)]
        assert got.reshape(-1).tolist() == expected, start
        assert torch.equal(got, keep_mask(key, start, (3, 100), torch.tensor(p)))
    monkeypatch.setattr(draws, "CHUNK", 7)
    assert torch.equal(keep_mask(key, 0, (3, 100), p), keep_mask(key, 0, (3, 100), torch.tensor(p)))


def test_a_scalar_probability_at_a_drawn_uniform_and_either_side_of_it() -> None:
    """p exactly an element's uniform keeps it not (u < p is strict), one float32 step
    above keeps it, one below not: the integer comparison's threshold, to the last step."""
    key = stream_key(9, "w", 1)
    u = uniforms(key, 77, 40)
    for j in range(40):
        at = u[j : j + 1]
        for p in (at, torch.nextafter(at, torch.ones(1)), torch.nextafter(at, -torch.ones(1))):
            got = keep_mask(key, 77, (40,), float(p))
            assert torch.equal(got, u < p), (j, float(p))
            assert bool(got[j]) == bool(u[j] < p)


def test_refuses_negative_indices() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        uniforms(1, -1, 3)
    with pytest.raises(ValueError, match="must be >= 0"):
        uniforms(1, 0, -3)
    with pytest.raises(ValueError, match="must be >= 0"):
        keep_mask(1, -1, (3,), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_same_numbers_on_cuda() -> None:
    key = stream_key(1, "t", 0)
    got = uniforms(key, 2**40, 3_000_000, device="cuda").cpu()
    assert torch.equal(got, uniforms(key, 2**40, 3_000_000))
    mask = keep_mask(key, 2**40, (3000, 1000), 0.3, device="cuda").cpu()
    assert torch.equal(mask, keep_mask(key, 2**40, (3000, 1000), 0.3))
