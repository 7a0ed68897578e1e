"""Packed variable-length batches (`cu_seqlens`) on the torch forms: the same outputs and final states as
running each sequence alone from its own initial state, for every op that takes them."""

import pytest
import torch

from linearize.kernels.gated_delta import gated_delta, gated_delta_reference
from linearize.kernels.gated_linear_attn import gated_linear_attn, gated_linear_attn_reference
from linearize.kernels.gated_slot_attn import gated_slot_attn, gated_slot_attn_reference

LENGTHS = [5, 70, 1, 33]
H, K, V, M = 2, 8, 6, 4


def inputs(op, total, generator):
    def r(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = r(1, total, H, K), r(1, total, H, K), r(1, total, H, V)
    if op == "gla":
        return (q, k, v, torch.nn.functional.logsigmoid(r(1, total, H, K)))
    if op == "gsa":
        g = torch.nn.functional.logsigmoid(r(1, total, H, M))
        return (q, k, v, 1 - g.exp(), g)
    k = torch.nn.functional.normalize(k, dim=-1)
    return (q, k, v, torch.nn.functional.logsigmoid(r(1, total, H)), torch.sigmoid(r(1, total, H)))


def states(op, n, generator):
    def r(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return (r(n, H, K, M), r(n, H, M, V)) if op == "gsa" else r(n, H, K, V)


OPS = {
    "gla": (gated_linear_attn, gated_linear_attn_reference),
    "gsa": (gated_slot_attn, gated_slot_attn_reference),
    "delta": (gated_delta, gated_delta_reference),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_sequences_equal_each_sequence_alone(op, with_state):
    fn, reference = OPS[op]
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    xs = inputs(op, int(cu[-1]), gen)
    h0 = states(op, len(LENGTHS), gen) if with_state else None
    o, final = fn(
        *xs, cu_seqlens=cu, initial_state=h0, output_final_state=True, impl="chunked", chunk_size=16
    )
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = None if h0 is None else (tuple(x[i : i + 1] for x in h0) if op == "gsa" else h0[i : i + 1])
        o_ref, f_ref = reference(*(x[:, a:b] for x in xs), initial_state=one, output_final_state=True)
        assert torch.allclose(o[:, a:b], o_ref, atol=1e-9), (op, i)
        got = tuple(x[i : i + 1] for x in final) if op == "gsa" else (final[i : i + 1],)
        for g_, r_ in zip(got, f_ref if op == "gsa" else (f_ref,)):
            assert torch.allclose(g_, r_, atol=1e-9), (op, i)


def test_bad_cu_seqlens_are_named():
    gen = torch.Generator().manual_seed(0)
    xs = inputs("gla", 10, gen)
    for bad, match in [
        (torch.tensor([0, 4, 9]), "rise strictly .* from 0 to T = 10"),
        (torch.tensor([0, 4, 4, 10]), "no empty sequence"),
        (torch.tensor([0.0, 10.0]), "1D integer tensor"),
    ]:
        with pytest.raises(ValueError, match=match):
            gated_linear_attn(*xs, cu_seqlens=bad, impl="chunked")
    with pytest.raises(ValueError, match="batch must be 1 packed row"):
        gated_linear_attn(*(torch.cat([x, x]) for x in xs), cu_seqlens=torch.tensor([0, 10]), impl="chunked")
    with pytest.raises(ValueError, match="initial_state needs 2 rows"):
        gated_linear_attn(*xs, cu_seqlens=torch.tensor([0, 3, 10]), initial_state=states("gla", 3, gen))
