"""Products on weights packed for oneDNN: the same as torch's, packed once per weight, packed
again when the weight changes, and the training loss the same with and without them."""

import gc
from unittest import mock

import pytest
import torch

from finetune_module.engine import packing, speedups


def test_packed_products_are_torchs_and_packs_are_kept_until_the_weight_changes() -> None:
    assert packing.available()
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 48), torch.randn(300)
    x = torch.randn(70, 48)
    packs = packing.FrozenPacks()
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packed: list[tuple[int, ...]] = []
    with mock.patch.object(
        torch.ops.mkldnn,
        "_reorder_linear_weight",
        side_effect=lambda w, rows: packed.append(tuple(w.shape)) or reorder(w, rows),
    ):
        for _ in range(2):
            out = packing.product(x, packs.weight(weight), bias)
            torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias))
        assert packed == [(300, 48)]  # once, kept for the second round
        assert out.shape == (70, 300) and out.is_contiguous()
        weight.mul_(2)  # changed in place: packed again, and the products follow
        torch.testing.assert_close(packing.product(x, packs.weight(weight)), x @ weight.T)
        assert packed == [(300, 48)] * 2
    ran: list[int] = []
    linear = torch.ops.mkldnn._linear_pointwise
    with mock.patch.object(
        torch.ops.mkldnn,
        "_linear_pointwise",
        side_effect=lambda x, *a: ran.append(x.shape[0]) or linear(x, *a),
    ):
        for rows in (1, 20, 32, 33, 64, 70, 300):
            packing.product(torch.randn(rows, 48), packs.weight(weight))
    assert ran == [1, 20, 32, 64, 64, 96, 320]  # above ROW_STEP rows, whole multiples of it
    del weight
    gc.collect()
    packs.weight(torch.randn(4, 4))  # a dead weight's copies go at the next call
    assert len(packs._packs) == 1


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_logit_free_loss_is_the_same_on_packed_weights(
    with_bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss and its gradient on the packed output layer equal those on torch's products
    (packing unavailable), over several chunks of rows; the packed copy is kept."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 400, 64, requires_grad=True)  # more rows than one chunk
    weight = torch.randn(1000, 64)
    bias = torch.randn(1000) if with_bias else None
    labels = torch.randint(0, 1000, (2, 400))
    labels[:, 350:] = -100
    results = []
    for available in (False, True):
        monkeypatch.setattr(packing, "available", lambda available=available: available)
        loss = speedups.linear_cross_entropy(hidden, weight, labels, bias)
        loss.backward()
        results.append((loss.detach(), hidden.grad.clone()))
        hidden.grad = None
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
    assert id(weight) in speedups._OUTPUT_PACKS._packs
