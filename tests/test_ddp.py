"""Data-parallel training on CPU (gloo): 2 processes, each reading its shard through the
trainer's own loader, agree with the single-process average gradient over the union of
their shards, and `torchrun -m segformer train` runs end to end."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import rel_err
from segformer.train import LOG_FILE, TRAINING_STATE, TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
# no dropout or drop path: the gradients must not depend on per-rank random draws; no
# loader worker processes, so the samples are read (and recorded) in this process
CONFIG = dict(data="synthetic", synthetic_size=64, batch_size=2, grad_accum=2, steps=4, kernels="torch", seed=5,
              drop_path_rate=0.0, classifier_dropout=0.0, progress=False, workers=0)


class RecordedSamples(torch.utils.data.Dataset):
    """A trainer's samples, noting every (epoch, index) key its loader asks for."""

    def __init__(self, samples):
        self.samples, self.keys = samples, []

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        self.keys.append(tuple(key))
        return self.samples[key]


def read_from_loader(trainer: Trainer, steps: int):
    """The micro-batches of the first ``steps`` steps as training reads them (the trainer's
    DataLoader over its sampler), and their keys, one list per micro-batch."""
    recorded = RecordedSamples(trainer.samples)
    trainer.samples = recorded
    batches = trainer._loader()
    try:
        micro_batches = [next(batches) for _ in range(steps * trainer.config.grad_accum)]
    finally:
        batches.close()
    size = trainer.config.batch_size
    return micro_batches, [recorded.keys[i : i + size] for i in range(0, len(recorded.keys), size)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_gradients(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**CONFIG, out=out_dir))
    try:
        assert trainer.group.world_size == world_size and trainer.group.rank == rank
        micro_batches, keys = read_from_loader(trainer, steps=1)
        losses = trainer.forward_backward(micro_batches)
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        torch.save({"keys": keys, "losses": losses, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        trainer.close()


def test_two_processes_average_the_shard_gradients(tmp_path):
    mp.spawn(rank_gradients, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    torch.set_num_threads(1)
    single = Trainer(TrainConfig(**CONFIG, out=str(tmp_path)))
    assert single.group.world_size == 1
    # the two ranks' first step reads what one process reads in its first two steps, split
    # into disjoint shards
    shard_keys = [{tuple(k) for micro in r["keys"] for k in micro} for r in results]
    _, single_keys = read_from_loader(single, steps=2)
    assert not shard_keys[0] & shard_keys[1]
    assert shard_keys[0] | shard_keys[1] == {k for micro in single_keys for k in micro}
    assert all(len(keys) == CONFIG["batch_size"] * CONFIG["grad_accum"] for keys in shard_keys)

    shard_grads = []
    for result in results:
        single.optimizer.zero_grad(set_to_none=True)
        losses = single.forward_backward([single.load_batch([tuple(k) for k in keys]) for keys in result["keys"]])
        torch.testing.assert_close(losses, result["losses"], rtol=1e-5, atol=0)
        shard_grads.append({name: p.grad.clone() for name, p in single.model.named_parameters()})

    for name, _ in single.model.named_parameters():
        average = (shard_grads[0][name] + shard_grads[1][name]) / 2
        for rank in range(2):
            got = results[rank]["grads"][name]
            assert rel_err(got, average) <= 1e-5, f"rank {rank} {name}: {rel_err(got, average):.2e}"
    # the shards really differ, so the average is not either shard's gradient
    assert any(rel_err(shard_grads[0][n], shard_grads[1][n]) > 1e-2 for n in shard_grads[0])


def torchrun(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "segformer", "train", *args, "--no-progress"]
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_torchrun_trains_and_resumes_with_two_processes(tmp_path):
    """One rank writes the files; the checkpoint holds both ranks' RNG states, so a resumed
    2-process run (dropout and drop path on) ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    completed = torchrun(["--data", "synthetic", "--synthetic-size", "64", "--steps", "2", "--batch-size", "1",
                          "--kernels", "torch", "--save-every", "1", "--log-every", "1", "--lr", "1e-4",
                          "--out", str(run_dir)], tmp_path)
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    assert [(r["step"], r["event"]) for r in records] == [(1, "train"), (2, "train"), (2, "val")]  # one writer
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    state = torch.load(run_dir / "checkpoint-000001" / TRAINING_STATE, weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert completed.stdout.count("trained 2 steps") == 1

    resumed = tmp_path / "resumed"
    torchrun(["--resume", str(run_dir / "checkpoint-000001"), "--out", str(resumed)], tmp_path)
    first, second = load_file(run_dir / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
