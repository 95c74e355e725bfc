"""contrastive_loss against the definition, tools/reference.py's per_target_loss (the release's loop
over the targets): values, gradients (anchors, targets, temperature), mask, DDP (2 gloo processes),
bf16 autocast."""
import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loss import contrastive_loss
from tools.reference import per_target_loss


def inputs(P=5, B=24, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(P, B, D, generator=g).requires_grad_()
    # correlated: non-trivial accuracy
    t = (a.detach() + 1.5 * torch.randn(P, B, D, generator=g)).requires_grad_()
    log_scale = torch.tensor(2.3, requires_grad=True)
    return a, t, log_scale


def text_mask(P=5, B=24):
    mask = torch.ones(P, B, dtype=torch.bool)
    mask[-1, ::3] = False  # the text target: every third shape has no text
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_the_loop(masked):
    a, t, log_scale = inputs()
    mask = text_mask() if masked else None
    out = contrastive_loss(a, t, log_scale.exp(), mask)
    ref, ref_acc = per_target_loss(a, t, log_scale.exp(), mask)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    got = torch.autograd.grad(out.loss, [a, t, log_scale])
    want = torch.autograd.grad(ref, [a, t, log_scale])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    assert torch.allclose(out.accuracy, ref_acc) and 0 < out.accuracy.mean() < 1
    assert torch.equal(out.count, (mask if masked else torch.ones(5, 24, dtype=torch.bool)).sum(1))
    assert torch.allclose(out.per_target.sum(), ref, atol=1e-5)


def test_temperature_gradient_is_nonzero_and_matches():
    a, t, log_scale = inputs(P=1, B=16)
    (g,) = torch.autograd.grad(contrastive_loss(a, t, log_scale.exp()).loss, [log_scale])
    (w,) = torch.autograd.grad(per_target_loss(a, t, log_scale.exp())[0], [log_scale])
    assert g.abs() > 1e-3 and torch.allclose(g, w, atol=1e-5)


def test_fully_masked_target_contributes_nothing():
    a, t, log_scale = inputs(P=2, B=8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False
    out = contrastive_loss(a, t, log_scale.exp(), mask)
    ref, _ = per_target_loss(a[:1], t[:1], log_scale.exp())
    assert torch.allclose(out.loss, ref, atol=1e-5) and out.per_target[1] == 0
    assert out.count.tolist() == [8, 0] and out.accuracy[1] == 0
    out.loss.backward()
    assert torch.isfinite(a.grad).all() and (a.grad[1] == 0).all() and (t.grad[1] == 0).all()


def test_accuracy_and_count():
    a = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    t = a.clone()
    # anchor i < 4 finds its copy at target i - 1: wrong; anchors 4..9 are right
    t[:, :4] = a[:, [1, 2, 3, 0]]
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[2, 4:6] = False  # two right ones without the third target
    out = contrastive_loss(a, t, torch.tensor(50.0), mask)
    assert out.count.tolist() == [10, 10, 8]
    assert torch.allclose(out.accuracy, torch.tensor([0.6, 0.6, 0.5]))
    assert torch.allclose(out.accuracy, per_target_loss(a, t, torch.tensor(50.0), mask)[1])


def test_bf16_autocast_inputs_give_the_float32_result():
    a, t, log_scale = inputs()
    a16, t16 = a.detach().bfloat16().requires_grad_(), t.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrastive_loss(a16, t16, log_scale.exp(), text_mask())
    ref, _ = per_target_loss(a16.detach().float(), t16.float(), log_scale.exp(), text_mask())
    assert out.loss.dtype == torch.float32 and torch.allclose(out.loss, ref, atol=1e-5)
    out.loss.backward()
    assert a16.grad.dtype == torch.bfloat16 and torch.isfinite(a16.grad.float()).all()


def test_no_host_synchronisation(monkeypatch):
    """On the meta device every value-dependent step (.item(), bool(tensor), a data-dependent shape)
    raises."""
    # no autocast on meta
    monkeypatch.setattr(torch, "autocast", lambda *args, **kw: contextlib.nullcontext())
    a = torch.empty(5, 24, 32, device="meta", requires_grad=True)
    mask = torch.empty(5, 24, dtype=torch.bool, device="meta")
    out = contrastive_loss(a, torch.empty(5, 24, 32, device="meta"), torch.empty((), device="meta"),
                           mask)
    (grad,) = torch.autograd.grad(out.loss, [a])
    assert grad.shape == a.shape and out.count.shape == out.accuracy.shape == (5,)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, a, t, mask, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gathers, real = [], dist.all_gather
    dist.all_gather = lambda *args, **kw: gathers.append(1) or real(*args, **kw)
    b = a.shape[1] // world
    la = a[:, rank * b:(rank + 1) * b].clone().requires_grad_()
    lt = t[:, rank * b:(rank + 1) * b].clone().requires_grad_()
    log_scale = torch.tensor(2.3, requires_grad=True)
    out = contrastive_loss(la, lt, log_scale.exp(), mask[:, rank * b:(rank + 1) * b])
    calls = [len(gathers)]
    with torch.no_grad():  # one target set instead of three: still one all_gather
        contrastive_loss(la[:1], lt[:1], log_scale.exp(), mask[:1, rank * b:(rank + 1) * b])
    calls.append(len(gathers) - calls[0])
    out.loss.backward()
    # what DDP does with parameter gradients: average over ranks
    grad_scale = log_scale.grad.clone()
    dist.all_reduce(grad_scale)
    torch.save(dict(calls=calls, loss=out.loss.item(), per_target=out.per_target,
                    accuracy=out.accuracy, count=out.count, a=la.grad / world, t=lt.grad / world,
                    scale=grad_scale / world),
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    a, t, _ = inputs(P=3, B=12)
    a, t = a.detach(), t.detach()
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) > 0.25
    mp.spawn(_worker, args=(2, _free_port(), a, t, mask, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    log_scale = torch.tensor(2.3, requires_grad=True)
    a1, t1 = a.clone().requires_grad_(), t.clone().requires_grad_()
    ref, ref_acc = per_target_loss(a1, t1, log_scale.exp(), mask)
    ref.backward()
    # mean of the rank losses = global loss
    assert abs(sum(r["loss"] for r in results) / 2 - ref.item()) < 1e-5
    for r in results:
        assert r["calls"] == [1, 1]  # one all_gather per call, whatever P
        assert torch.allclose(r["per_target"].sum(), ref, atol=1e-5)
        assert torch.allclose(r["accuracy"], ref_acc)
        assert torch.equal(r["count"], mask.sum(1))
        assert torch.allclose(r["scale"], log_scale.grad, atol=1e-5)
    # gradients w.r.t. each rank's features, scaled like DDP's average, equal the single-process
    # gradients
    assert torch.allclose(torch.cat([r["a"] for r in results], 1), a1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["t"] for r in results], 1), t1.grad, atol=1e-6)
