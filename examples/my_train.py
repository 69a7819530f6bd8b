"""A user's own torchrun-ready script, launched by hpcft with the same rendezvous as its entrypoint:

    hpcft submit --nodes 2 --gpus-per-node 2 jobs/samsum_tiny.yaml -- examples/my_train.py --steps 5
It reads RANK / WORLD_SIZE / LOCAL_RANK like any torchrun script and knows nothing about Slurm.
"""
import argparse
import gc
import json
import os
import socket

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(args.steps):
        loss = torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world])
        opt.zero_grad()
        loss.backward()
        opt.step()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    print(json.dumps({"rank": rank, "world": world, "host": socket.gethostname(), "rank_sum": total.item(),
                      "loss": loss.item(), "local_rank": int(os.environ["LOCAL_RANK"])}), flush=True)
    # Drop what holds the process group first: otherwise gloo aborts at exit in some runs (SIGABRT).
    del model, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
