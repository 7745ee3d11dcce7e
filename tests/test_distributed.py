"""Two CPU processes (gloo) against one process: cross-rank gathering and ClipLoss gradients.

What is compared: a tiny CLIP (two linear "encoders" + a learned log logit scale, same
seed on every rank) is wrapped in real DDP, so after ``backward`` each rank holds the
rank-average of the per-rank gradients, exactly what the optimizer steps with. Each of
the 2 ranks gets half of a fixed global batch of 6 pairs. The single-process reference is
the same model and ClipLoss on the whole batch. The logged loss is the rank-average of the
per-rank losses (identical values under ``local_loss=False``).

Expected (derivation in ``medvlp.losses.contrastive``):

* gather_with_grad=True, local_loss False or True: loss and every gradient equal the
  single-process ones (also with a negative mask from duplicated report keys that span
  both ranks);
* gather_with_grad=False, local_loss=True: the loss is right but the encoder gradients
  are wrong (a rank's features acting as negatives for the other rank's rows get no
  gradient);
* gather_with_grad=False, local_loss=False: encoder gradients are the single-process ones
  divided by the world size; the logit scale's gradient is exact.

The workers run once for the module (one spawn, ~10 s) and write their results to a file.
"""
from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
PER_RANK = 3
# (local_loss, gather_with_grad, use pair keys)
CONFIGS = {
    "global": (False, True, False),
    "local": (True, True, False),
    "local_keys": (True, True, True),
    "local_nograd": (True, False, False),
    "global_nograd": (False, False, False),
}
TOL = {"atol": 1e-5, "rtol": 1e-5}


class TinyClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = nn.Linear(5, 4)
        self.text_encoder = nn.Linear(7, 4)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images, texts):
        image_features = F.normalize(self.image_encoder(images), dim=-1)
        text_features = F.normalize(self.text_encoder(texts), dim=-1)
        return image_features, text_features, self.log_scale.exp().clamp(max=100.0)


def _make_model() -> TinyClip:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TinyClip()


def _global_batch():
    g = torch.Generator().manual_seed(123)
    images = torch.randn(WORLD * PER_RANK, 5, generator=g)
    texts = torch.randn(WORLD * PER_RANK, 7, generator=g)
    keys = torch.tensor([4, 1, 2, 4, 3, 1])  # duplicated reports across and within ranks
    return images, texts, keys


def _sinkhorn_scores():
    return torch.randn(WORLD * PER_RANK, 4, generator=torch.Generator().manual_seed(7)) * 2


def _loss_and_grads(model, loss_fn, images, texts, keys):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(*model(images, texts), pair_keys=keys)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(
        OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from medvlp import distributed as D
    from medvlp.losses import ClipLoss

    assert D.init_distributed() == (rank, WORLD, rank)
    assert D.is_distributed() and D.get_world_size() == WORLD and D.is_main_process() == (rank == 0)
    results: dict = {}

    # gather_features: values, and where the gradient of sum(weights * gathered) goes
    weights = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
    for with_grad in (True, False):
        local = torch.full((2, 3), float(rank + 1), requires_grad=True)
        gathered = D.gather_features(local, gather_with_grad=with_grad)
        (weights * gathered).sum().backward()
        results[f"gather_values_{with_grad}"] = gathered.detach()
        results[f"gather_grad_{with_grad}_rank{rank}"] = local.grad
    summed = D.all_reduce_sum(torch.tensor([float(rank + 1)]))
    results["all_reduce"] = summed

    images, texts, keys = _global_batch()
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    model = DistributedDataParallel(_make_model())
    for name, (local_loss, with_grad, use_keys) in CONFIGS.items():
        loss_fn = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad)
        loss, grads = _loss_and_grads(model, loss_fn, images[rows], texts[rows], keys[rows] if use_keys else None)
        results[name] = (D.all_reduce_sum(loss.clone()) / WORLD, {n.removeprefix("module."): g for n, g in grads.items()})

    # Sinkhorn: each rank codes its own rows; the column sums are reduced across ranks
    from medvlp.losses.prototypes import sinkhorn

    codes = sinkhorn(_sinkhorn_scores()[rows], eps=0.05, iters=5)
    results["sinkhorn"] = D.gather_features(codes, gather_with_grad=False)

    # rank 1 sends its per-rank gather gradients to rank 0, which writes the file
    for with_grad in (True, False):
        key = f"gather_grad_{with_grad}_rank1"
        buf = results.get(key, torch.zeros(2, 3))
        torch.distributed.broadcast(buf, src=1)
        results[key] = buf
    D.barrier()
    if rank == 0:
        torch.save(results, out_path)
    D.destroy_distributed()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("ddp") / "results.pt")
    context = mp.start_processes(
        _worker, args=(_free_port(), out_path), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises with the worker's traceback if one fails
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("2-process test timed out")
    return torch.load(out_path)


def _single_process(local_loss: bool, use_keys: bool):
    from medvlp.distributed import is_distributed
    from medvlp.losses import ClipLoss

    assert not is_distributed()
    images, texts, keys = _global_batch()
    return _loss_and_grads(_make_model(), ClipLoss(local_loss=local_loss), images, texts, keys if use_keys else None)


def test_gather_features_values_and_gradient_routing(two_rank_results):
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    weights = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3)
    for rank in range(WORLD):
        own = weights[rank * 2 : (rank + 1) * 2]
        # with grad: every rank's loss sends gradient to this slice, summed over ranks
        torch.testing.assert_close(two_rank_results[f"gather_grad_True_rank{rank}"], WORLD * own)
        # without: only this rank's own loss does
        torch.testing.assert_close(two_rank_results[f"gather_grad_False_rank{rank}"], own)
    torch.testing.assert_close(two_rank_results["gather_values_True"], expected)
    torch.testing.assert_close(two_rank_results["gather_values_False"], expected)
    assert two_rank_results["all_reduce"].item() == 3.0


@pytest.mark.parametrize("name", ["global", "local", "local_keys"])
def test_gather_with_grad_equals_single_process(two_rank_results, name):
    local_loss, _, use_keys = CONFIGS[name]
    loss, grads = two_rank_results[name]
    ref_loss, ref_grads = _single_process(local_loss, use_keys)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys()
    for param, ref in ref_grads.items():
        torch.testing.assert_close(grads[param], ref, **TOL, msg=lambda m: f"{name}/{param}: {m}")


def test_keys_mask_changes_the_loss(two_rank_results):
    # guards the previous test against a mask that silently does nothing
    assert abs(two_rank_results["local_keys"][0].item() - two_rank_results["local"][0].item()) > 1e-3


def test_local_loss_without_gather_grad_gives_wrong_gradients(two_rank_results):
    loss, grads = two_rank_results["local_nograd"]
    ref_loss, ref_grads = _single_process(local_loss=True, use_keys=False)
    torch.testing.assert_close(loss, ref_loss, **TOL)  # the forward is the same ...
    for param in ("image_encoder.weight", "text_encoder.weight"):  # ... the encoder gradients are not
        error = (grads[param] - ref_grads[param]).abs().max()
        assert error > 1e-2 * ref_grads[param].abs().max(), param
        # and not merely rescaled: no single factor maps one onto the other
        ratio = grads[param].flatten() / ref_grads[param].flatten()
        assert ratio.max() - ratio.min() > 1e-2, param
    torch.testing.assert_close(grads["log_scale"], ref_grads["log_scale"], **TOL)


def test_global_loss_without_gather_grad_scales_encoder_gradients_by_world(two_rank_results):
    loss, grads = two_rank_results["global_nograd"]
    ref_loss, ref_grads = _single_process(local_loss=False, use_keys=False)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for param in ("image_encoder.weight", "image_encoder.bias", "text_encoder.weight", "text_encoder.bias"):
        torch.testing.assert_close(grads[param] * WORLD, ref_grads[param], **TOL)
    torch.testing.assert_close(grads["log_scale"], ref_grads["log_scale"], **TOL)


def test_sinkhorn_across_ranks_equals_one_process(two_rank_results):
    from medvlp.losses.prototypes import sinkhorn

    single = sinkhorn(_sinkhorn_scores(), eps=0.05, iters=5)
    torch.testing.assert_close(two_rank_results["sinkhorn"], single, **TOL)
    # and per-rank Sinkhorn without the reduction would differ (guards against a no-op reduce)
    halves = torch.cat([sinkhorn(_sinkhorn_scores()[r * PER_RANK:(r + 1) * PER_RANK], eps=0.05, iters=5)
                        for r in range(WORLD)])
    assert (halves - single).abs().max() > 1e-3
