"""Checkpoints on disk, in one process with a real TorchEngine and DCP: atomic rename, pruning,
resume selection, and a crash mid-save that must not cost the previous checkpoint."""
import json

import pytest
import torch

from hpcft.distenv import DistEnv
from hpcft.errors import SpecError
from hpcft.paths import RunPaths
from hpcft.train.checkpoint import RunShape, TrainerState, find_resume, load_checkpoint, save_checkpoint
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime
from hpcft.train.engine import TorchEngine
from hpcft.train.optim import build_optimizer
from hpcft.train.precision import resolve_precision
from hpcft.worldplan import SavedRun, read_saved

RT = Runtime(env=DistEnv(), device=torch.device("cpu"), backend="gloo")
SHAPE = RunShape(world_size=1, micro_batch=16, accum=1, total_steps=20, strategy="ddp", use_peft=False)


def make_engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt, sched = build_optimizer(model, TrainConfig(lr=0.1, warmup_steps=1), total_steps=20)
    return TorchEngine(model, model, opt, sched, accum=1, clip=1.0, precision=resolve_precision("fp32"),
                       device=RT.device, peft=False)


def train_steps(engine, n):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        engine.backward(engine.model(x).pow(2).mean(), boundary=True)
        engine.step()


def test_save_load_roundtrip_restores_model_optimizer_scheduler_rng(tmp_path):
    paths = RunPaths(tmp_path / "run")
    a = make_engine()
    train_steps(a, 3)
    path = save_checkpoint(a, TrainerState(step=3, epoch=0, samples_in_epoch=48), paths, RT, keep=2, shape=SHAPE)
    expected = torch.rand(3)
    b = make_engine(seed=123)
    torch.rand(7)
    state = load_checkpoint(b, path, RT, saved=read_saved(path))
    assert torch.equal(torch.rand(3), expected)  # RNG restored to the moment of the save
    assert state == TrainerState(3, 0, 48) and b.lr() == a.lr()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    train_steps(a, 2)
    train_steps(b, 2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_complete_checkpoints_are_renamed_and_pruned(tmp_path):
    paths = RunPaths(tmp_path / "run")
    e = make_engine()
    for step in (1, 2, 3):
        save_checkpoint(e, TrainerState(step=step), paths, RT, keep=2, shape=SHAPE)
    names = sorted(p.name for p in paths.checkpoints.iterdir())
    assert names == ["step-00000002", "step-00000003"]
    assert find_resume("auto", paths).name == "step-00000003"


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    paths = RunPaths(tmp_path / "run")
    e = make_engine()
    save_checkpoint(e, TrainerState(step=5), paths, RT, keep=2, shape=SHAPE)

    def die(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(e, "save", die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(e, TrainerState(step=6), paths, RT, keep=2, shape=SHAPE)
    assert (paths.checkpoints / "step-00000006.tmp").is_dir()  # the half-written one stays aside
    assert find_resume("auto", paths).name == "step-00000005"
    monkeypatch.undo()
    save_checkpoint(e, TrainerState(step=6), paths, RT, keep=2, shape=SHAPE)  # the next save clears the leftover
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["step-00000005", "step-00000006"]


def test_resume_modes(tmp_path):
    job = tmp_path / "runs" / "name"
    a, b = RunPaths(job / "100"), RunPaths(job / "200")
    e = make_engine()
    save_checkpoint(e, TrainerState(step=7), a, RT, keep=2, shape=SHAPE)
    b.run_dir.mkdir(parents=True)
    assert find_resume("auto", b) is None  # a new job does not silently continue another one
    assert find_resume("latest", b).parent.parent == a.run_dir
    assert find_resume("never", a) is None
    assert find_resume(str(a.checkpoints / "step-00000007"), b).name == "step-00000007"
    with pytest.raises(SpecError, match="train.resume"):
        find_resume(str(tmp_path), b)
    assert json.loads((a.checkpoints / "step-00000007" / "trainer_state.json").read_text())["step"] == 7


def test_checkpoint_records_the_shape_a_resume_on_another_world_needs(tmp_path):
    paths = RunPaths(tmp_path / "run")
    path = save_checkpoint(make_engine(), TrainerState(step=4, epoch=1, samples_in_epoch=64), paths, RT, keep=2,
                           shape=SHAPE)
    assert read_saved(path) == SavedRun(step=4, epoch=1, samples_in_epoch=64, world_size=1, micro_batch=16, accum=1,
                                        total_steps=20, strategy="ddp", use_peft=False)


def test_async_save_writes_in_the_background_and_publishes_when_complete(tmp_path, monkeypatch):
    """train.async_checkpoint: the save returns once the state is staged; training may change the weights
    at once and the checkpoint still holds the staged values; it is renamed only when written, and a
    crash before that (here: the finisher stalled, then the process 'dies') leaves the previous one."""
    import time

    from hpcft.train.checkpoint import AsyncCheckpointer

    paths = RunPaths(tmp_path / "run")
    e = make_engine()
    background = AsyncCheckpointer(RT)
    train_steps(e, 2)
    staged = {k: v.clone() for k, v in e.model.state_dict().items()}
    save_checkpoint(e, TrainerState(step=2), paths, RT, keep=2, shape=SHAPE, background=background)
    train_steps(e, 3)  # training goes on while the checkpoint is written
    background.wait()
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["step-00000002"]
    (done,) = background.drain()  # what the run's metrics.jsonl records as checkpoint_written
    assert done["step"] == 2 and done["write_s"] > 0 and background.drain() == []
    restored = make_engine(seed=9)
    load_checkpoint(restored, find_resume("auto", paths), RT, saved=read_saved(find_resume("auto", paths)))
    for k, v in restored.model.state_dict().items():
        assert torch.equal(v, staged[k]), k  # the values at the save, not the ones trained after it
    monkeypatch.setenv("HPCFT_FAULT_SAVE_DELAY", "3:30")  # the finisher stalls before the rename
    save_checkpoint(e, TrainerState(step=3), paths, RT, keep=2, shape=SHAPE, background=background)
    time.sleep(1.0)
    assert (paths.checkpoints / "step-00000003.tmp" / "dcp" / ".metadata").is_file()  # written, not published
    assert find_resume("auto", paths).name == "step-00000002"  # a crash now costs nothing complete


def test_async_checkpoint_is_refused_for_zero():
    with pytest.raises(SpecError, match="train.async_checkpoint: covers ddp and fsdp"):
        TrainConfig(strategy="zero3", async_checkpoint=True).validate()


@pytest.mark.parametrize("field, value", [("save_every", 5), ("async_checkpoint", True), ("max_steps_this_run", 3)])
def test_no_checkpoints_is_refused_with_what_needs_them(field, value):
    TrainConfig(keep_checkpoints=0).validate()  # a smoke test or benchmark may write none
    with pytest.raises(SpecError, match=f"train.{field}: needs checkpoints, and keep_checkpoints is 0"):
        TrainConfig(keep_checkpoints=0, **{field: value}).validate()
    with pytest.raises(SpecError, match="train.keep_checkpoints: must be >= 0"):
        TrainConfig(keep_checkpoints=-1).validate()
