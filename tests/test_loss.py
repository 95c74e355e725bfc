"""The fused contrastive loss against the plain per-target loop (values, gradients, mask, temperature, DDP)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from loss import contrastive_loss


def reference_loss(anchors, targets, scale, mask=None):
    """The release: per target, normalise, logits, two cross-entropies; text term over shapes with text."""
    total, accs = 0.0, []
    for p in range(anchors.shape[0]):
        keep = mask[p] if mask is not None else slice(None)
        a, t = F.normalize(anchors[p][keep], dim=1), F.normalize(targets[p][keep], dim=1)
        logits = scale * a @ t.T
        labels = torch.arange(logits.shape[0])
        total = total + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        accs.append((logits.argmax(1) == labels).float().mean())
    return total, torch.stack(accs)


def inputs(P=5, B=24, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(P, B, D, generator=g).requires_grad_()
    t = (a.detach() + 1.5 * torch.randn(P, B, D, generator=g)).requires_grad_()  # correlated: non-trivial accuracy
    log_scale = torch.tensor(2.3, requires_grad=True)
    return a, t, log_scale


@pytest.mark.parametrize("chunk", [None, 5, 24])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_match_the_loop(chunk, masked):
    a, t, log_scale = inputs()
    mask = None
    if masked:
        mask = torch.ones(5, 24, dtype=torch.bool)
        mask[4, ::3] = False  # the text target: every third shape has no text
    out = contrastive_loss(a, t, log_scale.exp(), mask, chunk_size=chunk)
    ref, ref_acc = reference_loss(a, t, log_scale.exp(), mask)
    assert torch.allclose(out.loss, ref, atol=1e-5)
    got = torch.autograd.grad(out.loss, [a, t, log_scale])
    want = torch.autograd.grad(ref, [a, t, log_scale])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    assert torch.allclose(out.accuracy, ref_acc)
    assert 0 < out.accuracy.mean() < 1
    assert torch.allclose(out.per_target.sum(), ref, atol=1e-5)


def test_temperature_gradient_is_nonzero_and_matches():
    a, t, log_scale = inputs(P=1, B=16)
    out = contrastive_loss(a, t, log_scale.exp())
    (g,) = torch.autograd.grad(out.loss, [log_scale])
    ref, _ = reference_loss(a, t, log_scale.exp())
    (w,) = torch.autograd.grad(ref, [log_scale])
    assert g.abs() > 1e-3 and torch.allclose(g, w, atol=1e-5)


def test_fully_masked_target_contributes_nothing():
    a, t, log_scale = inputs(P=2, B=8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1] = False
    out = contrastive_loss(a, t, log_scale.exp(), mask)
    ref, _ = reference_loss(a[:1], t[:1], log_scale.exp())
    assert torch.allclose(out.loss, ref, atol=1e-5) and out.per_target[1] == 0
    out.loss.backward()
    assert torch.isfinite(a.grad).all() and (a.grad[1] == 0).all()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, a, t, mask, chunk, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = a.shape[1] // world
    la = a[:, rank * b:(rank + 1) * b].clone().requires_grad_()
    lt = t[:, rank * b:(rank + 1) * b].clone().requires_grad_()
    log_scale = torch.tensor(2.3, requires_grad=True)
    out = contrastive_loss(la, lt, log_scale.exp(), mask[:, rank * b:(rank + 1) * b], chunk_size=chunk)
    out.loss.backward()
    # what DDP does with parameter gradients: average over ranks
    grad_scale = log_scale.grad.clone()
    dist.all_reduce(grad_scale)
    torch.save((rank, out.loss.item(), out.per_target, out.accuracy, la.grad / world, lt.grad / world, grad_scale / world),
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("chunk", [None, 4])
def test_two_processes_equal_one_process_on_the_concatenated_batch(chunk, tmp_path):
    a, t, _ = inputs(P=3, B=12)
    a, t = a.detach(), t.detach()
    mask = torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) > 0.25
    mp.spawn(_worker, args=(2, _free_port(), a, t, mask, chunk, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    log_scale = torch.tensor(2.3, requires_grad=True)
    a1, t1 = a.clone().requires_grad_(), t.clone().requires_grad_()
    single = contrastive_loss(a1, t1, log_scale.exp(), mask)
    single.loss.backward()
    assert abs(sum(r[1] for r in results) / 2 - single.loss.item()) < 1e-5  # mean of rank losses = global loss
    for r in results:
        assert torch.allclose(r[2], single.per_target, atol=1e-5) and torch.allclose(r[3], single.accuracy)
        assert torch.allclose(r[6], log_scale.grad, atol=1e-5)
    # gradients w.r.t. each rank's features, scaled like DDP's average, equal the single-process gradients
    assert torch.allclose(torch.cat([r[4] for r in results], 1), a1.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r[5] for r in results], 1), t1.grad, atol=1e-6)


def test_large_batches_switch_to_recomputed_blocks_with_the_same_result(monkeypatch):
    import loss
    a, t, log_scale = inputs(P=3, B=16)
    keep = contrastive_loss(a, t, log_scale.exp())
    g_keep = torch.autograd.grad(keep.loss, [a, log_scale])
    monkeypatch.setattr(loss, "KEEP_LOGITS", 10)  # every batch counts as large now
    calls = []
    real = loss._FusedInfoNCE.apply
    monkeypatch.setattr(loss._FusedInfoNCE, "apply", lambda *args: calls.append(args[-1]) or real(*args))
    blocks = contrastive_loss(a, t, log_scale.exp())
    g_blocks = torch.autograd.grad(blocks.loss, [a, log_scale])
    assert calls == [16]  # one target's rows per block
    assert torch.allclose(keep.loss, blocks.loss, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(g_keep, g_blocks))
