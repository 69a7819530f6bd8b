"""Under torchrun: hpcft's apply_zero for ZeRO-3 on the tiny model, then one line saying whether every
fp32 master partition is the parameter partition itself (no second copy), whether hpcft's patch ran and
whether DeepSpeed's comm backend loaded its shared-memory (inference) op.

    torchrun --standalone --nproc-per-node 2 tests/zero3_partition_worker.py MODEL_DIR fp32
"""
import json
import sys

import deepspeed.comm.comm as ds_comm
from transformers import AutoModelForCausalLM

from hpcft.distenv import collect_dist_env
from hpcft.train.config import TrainConfig
from hpcft.train.dist import cleanup, setup_distributed
from hpcft.train.parallel import apply_zero
from hpcft.train.zero_patches import fp32_partition_copy_bug

rt = setup_distributed(collect_dist_env(), timeout_s=120)
cfg = TrainConfig(model_name=sys.argv[1], strategy="zero3", precision=sys.argv[2])
engine = apply_zero(AutoModelForCausalLM.from_pretrained(sys.argv[1]), cfg=cfg, rt=rt, total_steps=4)
opt = engine.model.optimizer
pairs = list(zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat))
if rt.is_main:
    print("RESULT " + json.dumps({"shared": all(a is b for a, b in pairs), "groups": len(pairs),
                                  "bug_in_deepspeed": fp32_partition_copy_bug(),
                                  "patched": getattr(type(opt)._create_fp32_partitions, "_hpcft_patch", False),
                                  "shm_op": ds_comm.cdb.shm_comm_op is not None}),
          flush=True)
del engine, opt, pairs
cleanup()
