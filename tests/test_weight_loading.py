"""hpcft.train.loading: reading each rank's rows and ZeRO-3 partitions from safetensors files, the names
PEFT gives parameters, and (under torchrun, 4 ranks) what loading a ~300M-parameter model costs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hpcft.train.loading import SafetensorsWeights, build_on_meta, checkpoint_key
from hpcft.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def test_peft_names_map_to_the_models_own_files():
    assert checkpoint_key("base_model.model.model.layers.3.self_attn.q_proj.base_layer.weight") == \
        "model.layers.3.self_attn.q_proj.weight"
    assert checkpoint_key("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert checkpoint_key("base_model.model.lm_head.weight") == "lm_head.weight"


@pytest.fixture()
def weight_files(tmp_path):
    """Two safetensors shards with an index, in three dtypes, as save_pretrained writes big models."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(37, 11, generator=g), "b.weight": torch.randn(64, generator=g).bfloat16(),
               "c.weight": torch.randn(5, 3, 4, generator=g).half(), "d.scalar": torch.tensor(2.5)}
    save_file({k: tensors[k] for k in ("a.weight", "d.scalar")}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in ("b.weight", "c.weight")}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                            "d.scalar": "model-00001-of-00002.safetensors",
                                            "b.weight": "model-00002-of-00002.safetensors",
                                            "c.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return tmp_path, tensors


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8, 40])
def test_each_ranks_rows_and_partitions_match_the_whole_tensor(weight_files, parts):
    """What every rank of a world of `parts` reads, put together, is the tensor: FSDP's rows (torch.chunk
    on dim 0) and ZeRO-3's flat partitions (ceil(numel / parts) each, the last padded), in the file's
    dtype (read in place) or another (converted)."""
    root, tensors = weight_files
    weights = SafetensorsWeights.open(root)
    for key, whole in tensors.items():
        for dtype in (whole.dtype, torch.float32):
            if whole.dim():
                rows = [torch.empty(c.shape, dtype=dtype) for c in torch.chunk(whole, parts)]
                start = 0
                for r in rows:
                    index = (slice(start, start + r.shape[0]), *(slice(0, n) for n in whole.shape[1:]))
                    weights.read_rows(key, index, r)
                    start += r.shape[0]
                assert torch.equal(torch.cat(rows), whole.to(dtype))
            size = -(-whole.numel() // parts)
            flat = torch.zeros(size * parts, dtype=dtype)
            for rank in range(parts):
                count = max(0, min(size, whole.numel() - rank * size))
                weights.read_flat(key, rank * size, flat[rank * size:rank * size + count])
            assert torch.equal(flat[:whole.numel()], whole.to(dtype).reshape(-1))
    col = torch.empty(37, 4)
    weights.read_rows("a.weight", (slice(0, 37), slice(4, 8)), col)  # columns cut: safetensors' own slicing
    assert torch.equal(col, tensors["a.weight"][:, 4:8])
    with pytest.raises(ValueError, match="elements"):
        weights.read_flat("a.weight", 400, torch.empty(20))


def test_a_file_that_does_not_name_every_parameter_is_found_before_loading(tmp_path, tiny_model):
    """Renamed keys (or a model whose files are not safetensors) send fsdp to rank 0's read and ZeRO-3
    to transformers' loader; tied embeddings count under either name."""
    cfg = TrainConfig(model_name=str(tiny_model))
    model = build_on_meta(cfg, seq2seq=False, dtype=torch.float32)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert SafetensorsWeights.open(tiny_model).missing(model) == []
    state = load_file(Path(tiny_model) / "model.safetensors")
    state["model.norm.scale"] = state.pop("model.norm.weight")
    save_file(state, tmp_path / "model.safetensors")
    assert SafetensorsWeights.open(tmp_path).missing(model) == ["model.norm.weight"]
    assert SafetensorsWeights.open(tmp_path / "nowhere") is None


@pytest.fixture(scope="module")
def model_300m(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "llama-300m"
    subprocess.run([sys.executable, "-m", "hpcft.cli", "make-tiny-model", str(out), "--hidden-size", "1024",
                    "--layers", "24", "--heads", "16"], cwd=ROOT, check=True, capture_output=True)
    yield out
    shutil.rmtree(out, ignore_errors=True)  # 1.2 GB: not kept for the rest of the session


@pytest.mark.slow
def test_four_ranks_hold_about_one_copy_of_a_300m_model_while_loading(tmp_path, model_300m):
    """4 ranks on one node, fsdp and zero3: the ranks' peak RSS added while the weights load and shard,
    summed, stays within 1.5x one copy of the weights (every rank reading the whole model was ~4x), and
    both give the loss of the same weights before training."""
    losses = {}
    for strategy in ("fsdp", "zero3"):
        run_dir = tmp_path / strategy
        env = dict(os.environ, HPCFT_RUN_DIR=str(run_dir), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                               "-m", "hpcft.train", f"--model_name={model_300m}", f"--strategy={strategy}",
                               "--max_train_step=1", "--max_eval_step=1", "--val_batch_size=2",
                               "--batch_size_training=1", "--context_length=64", "--save_model=false", "--plot=false",
                               "--keep_checkpoints=0"],  # a 300M model's checkpoint is 3.5 GB of disk
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not any((run_dir / "checkpoints").glob("*")), "keep_checkpoints: 0 writes no checkpoint"
        summary = json.loads((run_dir / "summary.json").read_text())
        loading = summary["weight_loading"]
        assert loading["mode"] == {"fsdp": "sharded", "zero3": "zero_init"}[strategy]
        assert summary["parameters"] > 290_000_000 and loading["weights_mib"] > 1100
        assert len(loading["added_rss_mib_per_rank"]) == 4
        assert loading["sum_over_one_copy"] <= 1.5, loading
        losses[strategy] = summary["eval_loss_before"]
    assert losses["fsdp"] == pytest.approx(losses["zero3"], abs=1e-5)
