"""gather_across_devices under a process group (gloo, 2 processes on the CPU): cached mnrl on each process's half
of a global batch, its candidates gathered across processes with gradients, gives the loss and (averaged as DDP
averages) the gradients of one process on the whole batch; and a Lightning DDP fit trains with it."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minilm_sts.training.losses import build_loss
from minilm_sts.training.sentence_encoder_training import SentenceEncoderTraining

from helpers import cli

# 8 rows (anchor, positive, negative), column-major per process: each process takes 4 rows.
ANCHORS = ["a man plays the guitar", "the dog runs", "a cat eats food", "children play on the street",
           "a woman plays the piano", "men eat", "a child runs", "the car is on the road"]
POSITIVES = ["a man is playing a guitar", "dogs run", "the cat is eating", "a child is playing",
             "the woman plays piano", "the men are eating", "the child is running", "a car on a road"]
NEGATIVES = ["a woman is eating", "the cat plays", "water", "a man runs with a dog", "the ball", "dogs eat food",
             "women play", "a cat on a car"]
PARAMS = {"mini_batch_size": 3, "gather_across_devices": True, "symmetric": True}


def loss_and_gradients(model_dir: str, rows: slice) -> tuple[float, torch.Tensor]:
    """Cached mnrl of these rows, in eval mode (no dropout, whose draws differ between processes), and the flat
    gradient of every trained parameter."""
    module = SentenceEncoderTraining(pretrained=model_dir).eval()
    columns = [ANCHORS[rows], POSITIVES[rows], NEGATIVES[rows]]
    batch = {**module.sentence_encoder.tokenize([s for column in columns for s in column]),
             "labels": torch.ones(len(columns[0])), "columns": 3}
    loss = module._step_loss(build_loss("mnrl", PARAMS), batch, {})
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _process(rank: int, port: int, model_dir: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss, grads = loss_and_gradients(model_dir, slice(4 * rank, 4 * rank + 4))
        both = torch.tensor([loss])
        dist.all_reduce(both)
        dist.all_reduce(grads)  # DDP's average: the sum over processes, halved below
        if rank == 0:
            torch.save((both.item() / 2, grads / 2), results)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.slow
def test_gathered_cached_mnrl_on_two_processes_equals_one_process(tiny_model_dir, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.start_processes(_process, args=(port, str(tiny_model_dir), str(tmp_path / "results.pt")), nprocs=2,
                       start_method="spawn")
    loss, grads = torch.load(tmp_path / "results.pt")
    expected_loss, expected = loss_and_gradients(str(tiny_model_dir), slice(0, 8))
    assert abs(loss - expected_loss) <= 1e-5 * expected_loss
    assert torch.allclose(grads, expected, rtol=1e-4, atol=1e-6 * expected.abs().max())


@pytest.mark.distributed
@pytest.mark.slow
def test_a_ddp_fit_trains_cached_gathered_mnrl(tiny_model_dir, pair_files, tmp_path):
    """DDP's gradient reduction sees each parameter's gradient once per step although GradCache re-embeds several
    mini-batches in its backward (it refuses a second one)."""
    cli("fit", "--model.pretrained", str(tiny_model_dir), "--model.loss", "mnrl", "--model.loss_params",
        "{mini_batch_size: 2, gather_across_devices: true, mask_known_duplicates: true}",
        "--data.train_path", str(pair_files["train"]), "--data.val_path", str(pair_files["val"]),
        "--data.test_path", "null", "--data.batch_size", "4", "--data.forgetting_guard", "false",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "runs", cwd=tmp_path)
    assert next((tmp_path / "runs").rglob("last.ckpt"))
