"""setup -> build the session -> train -> evaluate / export / summarize -> cleanup, for every launcher
(torchrun, srun one task per rank, accelerate launch, plain python)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import torch.distributed as dist

from hpcft.checks import check_export_dir
from hpcft.distenv import RUN_DIR_VAR, SAMPLE_LOG_VAR, collect_dist_env, collect_slurm_env, nccl_report
from hpcft.paths import RunPaths, export_dirs, local_run_dir
from hpcft.rankstats import rank_summary
from hpcft.train.checkpoint import AsyncCheckpointer, TrainerState, save_checkpoint
from hpcft.train.config import TrainConfig
from hpcft.train.dist import Runtime, barrier, cleanup, gather_per_rank, print0, setup_distributed
from hpcft.train.flops import peak_memory_bytes
from hpcft.train.loop import SampleLog, TrainResult, evaluate, profiler_context, train
from hpcft.train.metrics import MetricsWriter, ProgressDisplay, plot_metrics
from hpcft.train.model import check_model_dir, check_quantization
from hpcft.train.preempt import StopRequest
from hpcft.train.preflight import preflight
from hpcft.train.session import Session, build_session
from hpcft.train.watchdog import Progress, watch


def choose_run_dir(rt: Runtime) -> Path:
    """The launch path's run directory (RUN_DIR_VAR), else runs/local/<time> picked by rank 0 and
    shared, so that ranks started by any launcher agree on one directory."""
    if os.environ.get(RUN_DIR_VAR):
        return Path(os.environ[RUN_DIR_VAR])
    choice = [str(local_run_dir(time.strftime("%Y%m%d-%H%M%S")))]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])


def quiet_libraries() -> None:
    """Per-example progress bars from datasets/transformers would drown the per-rank logs. datasets is
    told through its variable: a rank that only reads the tokenized cache never imports it."""
    import transformers

    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Deprecations inside DeepSpeed and transformers, not in anything the user wrote: DeepSpeed calls the
    # old collective names on every ZeRO step, and its warning filters reset Python's once-per-place
    # memory, so each call printed again (thousands of lines per rank per minute).
    for old in ("torch.distributed.reduce_scatter_tensor", "torch.distributed.all_gather_into_tensor",
                "is_gradient_checkpointing"):
        warnings.filterwarnings("ignore", message=f"`{old}` is deprecated", category=FutureWarning)


def run(cfg: TrainConfig, *, flag_notes: list[str] | tuple[str, ...] = ()) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub: a missing local file must fail, not download
    quiet_libraries()
    cfg.validate()
    check_model_dir(cfg)
    check_export_dir(cfg.export_dir if cfg.save_model else None)
    check_quantization(cfg)
    dist_env = collect_dist_env()
    stop = StopRequest().install()  # before anything slow: the warning may come during start-up
    rt = setup_distributed(dist_env, timeout_s=cfg.timeout_s)
    paths = RunPaths(choose_run_dir(rt))
    if rt.is_main:
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        paths.train_config.write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    print(f"hpcft.train: rank {dist_env.rank}/{dist_env.world_size} on {socket.gethostname()} "
          f"(local rank {dist_env.local_rank}, device {rt.device})", flush=True)
    if flag_notes:
        print0(rt, "hpcft.train: llama-recipes flags: " + "; ".join(flag_notes))
    if cfg.preflight:
        print0(rt, preflight(rt, paths.run_dir))
    print0(rt, f"hpcft.train: {dist_env.world_size} rank(s) via {dist_env.launcher}, device {rt.device.type}, "
               f"backend {rt.backend}, strategy {cfg.strategy}, precision {cfg.precision}, run dir {paths.run_dir}")
    if rt.backend == "nccl":
        print0(rt, f"hpcft.train: NCCL settings: {nccl_report(os.environ)}")
    with watch(cfg.hang_timeout_s, rt, paths) as beat:
        beat.phase("load")
        summary = _train_and_finish(build_session(cfg, rt, paths), stop, beat)
    # The session (engine, optimizer, loaders) is gone with _train_and_finish's frame. Destroying the
    # process group while a DeepSpeed/DDP/FSDP object still holds it aborts the process at exit
    # (SIGABRT in about half the runs), which Slurm would report as a failed job.
    cleanup()
    return summary


def _train_and_finish(s: Session, stop: StopRequest, beat: Progress) -> dict:
    """Train; then, unless stopped for a requeue, evaluate, export and write the summary."""
    summary = start_summary(s)
    metrics = MetricsWriter(s.paths.metrics, enabled=s.rt.is_main, trackers=open_trackers(s) if s.rt.is_main else None)
    if s.resume_from is not None:
        write_restart(s, metrics)
    if s.data.eval_loader is not None:
        summary["eval_loss_before"] = evaluate_session(s, metrics, "before", beat)
    result = train_session(s, metrics, stop, beat)
    if result.preempted:
        # Little time is left before Slurm kills the job: no eval or export, just ask for the requeue.
        if s.rt.is_main:
            s.paths.requeue_marker.write_text(f"{s.state.step}\n")
            metrics.write(event="preempted", step=s.state.step, signal=stop.signal)
            metrics.close()
        print0(s.rt, f"hpcft.train: stopped at step {s.state.step} on {stop.signal or 'a peer'}'s warning; "
                     + ("checkpoint written, the job will requeue and resume" if s.cfg.keep_checkpoints else
                        "no checkpoint (keep_checkpoints: 0), the requeued job starts over"))
        return {"preempted": True, "steps": s.state.step}
    summary.update(steps=result.steps, steps_this_run=result.steps_this_run, final_train_loss=result.last_loss,
                   train_seconds=round(result.seconds, 3), mfu=result.mfu,
                   tokens_per_s=round(result.tokens / max(result.seconds, 1e-9), 1),
                   finished=result.steps >= s.data.total_steps)
    if s.data.eval_loader is not None:
        summary["eval_loss_after"] = evaluate_session(s, metrics, "after", beat)
    if s.cfg.save_model:
        beat.phase("export")
        summary["model_dir"] = os.path.abspath(export_model(s))  # export_dir may be relative to the ranks' cwd
    summary.update(rank_summary(gather_per_rank(s.rt, {"rank": s.rt.env.rank, "host": socket.gethostname(),
                                                       **beat.stats()})))
    summary["peak_memory_bytes_per_rank"] = gather_per_rank(s.rt, peak_memory_bytes(s.rt.device))
    summary["weight_loading"] = s.load_memory
    metrics.close()
    write_summary(s, summary)
    return summary


def start_summary(s: Session) -> dict:
    cfg, rt = s.cfg, s.rt
    return {"world_size": rt.env.world_size, "launcher": rt.env.launcher, "strategy": cfg.strategy,
            "sharding_strategy": cfg.sharding_strategy if cfg.strategy == "fsdp" else None,
            "precision": cfg.precision, "use_peft": cfg.use_peft, "seq2seq": s.data.seq2seq,
            "parameters": s.n_params, "trainable_parameters": s.n_trainable,
            "steps_per_epoch": s.data.steps_per_epoch, "total_steps": s.data.total_steps, "device": rt.device.type,
            "backend": rt.backend, "resumed_from": str(s.resume_from) if s.resume_from else None,
            "resume_adaptation": s.adaptation, "restarts": collect_slurm_env().restart_count,
            "global_batch": s.shape.world_size * s.shape.micro_batch * s.shape.accum,
            "gradient_accumulation_steps": s.cfg.gradient_accumulation_steps, "start_step": s.state.step, "peak_flops_per_rank": s.flops.peak_per_rank,
            "peak_flops_source": s.flops.peak_source}


def open_trackers(s: Session):
    """rank 0's experiment trackers (train.report_to), with the job's spec as parameters: spec.json, which
    hpcft submit writes into the run directory, else this run's training config and world."""
    from hpcft.train.trackers import Trackers

    if not s.cfg.trackers:
        return None
    try:
        params = json.loads(s.paths.spec.read_text())
    except (OSError, ValueError):
        params = {"train": dataclasses.asdict(s.cfg)}
    slurm = collect_slurm_env()
    params["world"] = {"world_size": s.rt.env.world_size, "nodes": len(slurm.job_nodelist) or 1,
                       "job_id": slurm.job_id, "strategy": s.cfg.strategy}
    return Trackers(s.cfg.trackers, run_dir=s.paths.run_dir, project=slurm.job_name or "hpcft",
                    run_name=s.paths.run_dir.name, params=params)


def write_restart(s: Session, metrics: MetricsWriter) -> None:
    """The event line that marks a resume in metrics.jsonl: steps after `step` logged before it were
    lost with the previous attempt and are trained again (hpcft.train.metrics.effective_rows)."""
    slurm = collect_slurm_env()
    metrics.write(event="restart", step=s.state.step, resumed_from=str(s.resume_from),
                  world_size=s.rt.env.world_size, nodes=list(slurm.job_nodelist) or None,
                  restart_count=slurm.restart_count, adaptation=s.adaptation)


def evaluate_session(s: Session, metrics: MetricsWriter, when: str, beat: Progress) -> float:
    """Eval loss over the whole eval split, all ranks together; logged and written to metrics."""
    beat.phase("eval")
    loss = evaluate(s.engine, s.data.eval_loader, s.rt, max_steps=s.cfg.max_eval_step, seq2seq=s.data.seq2seq)
    metrics.write(event="eval", step=s.state.step, eval_loss=loss)
    print0(s.rt, f"hpcft.train: eval loss {when} {loss:.4f}")
    return loss


def train_session(s: Session, metrics: MetricsWriter, stop: StopRequest, beat: Progress) -> TrainResult:
    """The training loop from s.state, with periodic checkpoints and one at the end of this run
    (none with keep_checkpoints 0)."""
    background = AsyncCheckpointer(s.rt) if s.cfg.async_checkpoint else None

    def written() -> None:
        for done in background.drain() if background is not None else []:
            metrics.write(event="checkpoint_written", **done)

    def save(st: TrainerState) -> None:
        beat.phase("checkpoint")
        t = time.perf_counter()
        path = save_checkpoint(s.engine, st, s.paths, s.rt, keep=s.cfg.keep_checkpoints, shape=s.shape,
                               background=background)
        blocked = time.perf_counter() - t  # what training waited for (async: the previous save, the staging copy)
        written()
        metrics.write(event="checkpoint", step=st.step, blocked_s=round(blocked, 4),
                      mode="async" if background else "sync")
        print0(s.rt, f"hpcft.train: checkpoint {path}" + (" (writing in the background)" if background else "")
               + f"; training blocked {blocked:.2f} s")

    progress = ProgressDisplay(s.data.total_steps, enabled=s.rt.is_main, start=s.state.step)
    sample_log = SampleLog(s.paths.sample_ids(s.rt.env.rank)) if os.environ.get(SAMPLE_LOG_VAR) == "1" else None
    with profiler_context(s.cfg.use_profiler, Path(s.cfg.profiler_dir or s.paths.profiler), s.rt.env.rank) as prof:
        result = train(s.engine, s.data.train_loader, s.cfg, s.rt, total_steps=s.data.total_steps, state=s.state,
                       metrics=metrics, progress=progress, flops=s.flops, save=save, profiler=prof, stop=stop,
                       seq2seq=s.data.seq2seq, sample_log=sample_log, beat=beat)
    progress.close()
    if sample_log is not None:
        sample_log.close()
    if result.steps_this_run and s.cfg.keep_checkpoints:
        save(s.state)
    if background is not None:
        beat.phase("checkpoint")
        background.wait()  # the last checkpoint is complete before eval, export, a requeue or the exit
        written()
    return result


@contextlib.contextmanager
def no_deepspeed_probe():
    """save_pretrained unwraps the model through accelerate, which imports DeepSpeed (seconds, on every
    export) only to ask whether the model is a DeepSpeedEngine. Without ZeRO DeepSpeed was never imported,
    so no model can be one: accelerate is told it is unavailable for that question alone."""
    if "deepspeed" in sys.modules:
        yield
        return
    try:
        import accelerate.utils.other as other
    except ImportError:
        yield
        return
    probe = getattr(other, "is_deepspeed_available", None)
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules
    try:
        yield
    finally:
        if probe is None:
            del other.is_deepspeed_available
        else:
            other.is_deepspeed_available = probe


def export_model(s: Session) -> Path:
    """Consolidated HF model (or the PEFT adapter) that from_pretrained / PeftModel loads. Gathered
    from every rank, written by rank 0 into a temporary directory and renamed."""
    state = s.engine.full_state_dict()
    target, tmp = export_dirs(s.paths, s.cfg.export_dir)
    if s.rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with no_deepspeed_probe():
            s.engine.hf_model.save_pretrained(tmp, state_dict=state)
        s.data.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    barrier(s.rt)
    return target


def write_summary(s: Session, summary: dict) -> None:
    """summary.json (and the metrics plot), on rank 0."""
    if not s.rt.is_main:
        return
    if s.cfg.plot:
        plot = plot_metrics(s.paths.metrics, s.paths.metrics_plot)
        summary["plot"] = str(plot) if plot else None
    summary.update(run_dir=str(s.paths.run_dir), metrics=str(s.paths.metrics))
    s.paths.summary.write_text(json.dumps(summary, indent=1) + "\n")
    print0(s.rt, "hpcft.train: done " + json.dumps(summary))
