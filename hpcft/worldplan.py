"""What "continue" means when a run resumes on a different number of ranks, as one pure rule (no
torch): the login node checks a resume with it before the queue, and the ranks adapt with it.

Kept: the global batch (micro-batch x accumulation x ranks), the LR schedule (total optimizer steps of
the whole run) and the data position in global samples. Changed: gradient accumulation.

    saved = read_saved(Path("runs/it/123/checkpoints/step-00000010"))
    plan = adapt(saved, world_size=4, micro_batch=4, accum=1, strategy="fsdp", use_peft=False)
    plan.accum, plan.describe()
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hpcft.errors import SpecError

STATE_FILE = "trainer_state.json"  # hpcft.paths.CheckpointPaths.state names it too
TORCH_FAMILY = ("ddp", "fsdp")  # DCP checkpoints: either loads the other's, on any world size


@dataclass(frozen=True)
class SavedRun:
    """A checkpoint's trainer_state.json: where the run was, and the shape of the run that wrote it.
    Checkpoints written before hpcft recorded the shape have None there."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    samples_in_epoch: int = 0  # global samples of that epoch already consumed (any world size)
    world_size: int | None = None
    micro_batch: int | None = None  # batch_size_training
    accum: int | None = None  # gradient_accumulation_steps
    total_steps: int | None = None  # optimizer steps of the whole run (the LR schedule's length)
    strategy: str | None = None
    use_peft: bool | None = None

    @property
    def global_batch(self) -> int | None:
        if None in (self.world_size, self.micro_batch, self.accum):
            return None
        return self.world_size * self.micro_batch * self.accum

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"


def read_saved(ckpt_dir: str | Path) -> SavedRun:
    """SavedRun of a complete checkpoint directory; an older state (batches_in_epoch, per rank) is read
    as the same position, counted in global samples, when its shape is known."""
    data = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    known = {f.name for f in fields(SavedRun)}
    saved = SavedRun(**{k: v for k, v in data.items() if k in known})
    if "batches_in_epoch" in data and "samples_in_epoch" not in data and saved.micro_batch and saved.world_size:
        saved = SavedRun(**{**asdict(saved), "samples_in_epoch":
                            data["batches_in_epoch"] * saved.micro_batch * saved.world_size})
    return saved


@dataclass(frozen=True)
class Adaptation:
    """How a resumed run continues the saved one."""

    accum: int  # gradient accumulation to use now
    global_batch: int
    total_steps: int | None  # the saved schedule's length (None: unknown, plan it afresh)
    saved_world: int | None
    world_size: int
    saved_accum: int | None

    @property
    def changed(self) -> bool:
        return self.saved_world is not None and (self.saved_world != self.world_size or self.saved_accum != self.accum)

    def describe(self) -> str:
        if self.saved_world is None:
            return "checkpoint records no world size: resumed as saved, nothing adapted"
        if not self.changed:
            return f"same world ({self.world_size} ranks), nothing adapted"
        return (f"world {self.saved_world} -> {self.world_size} ranks: gradient accumulation {self.saved_accum} -> "
                f"{self.accum}, global batch {self.global_batch} kept, schedule of {self.total_steps} steps kept, "
                f"data position kept in global samples")


def compatible(saved_strategy: str, strategy: str) -> bool:
    if saved_strategy == strategy:
        return True
    return saved_strategy in TORCH_FAMILY and strategy in TORCH_FAMILY


def adapt(saved: SavedRun, *, world_size: int, micro_batch: int, accum: int, strategy: str,
          use_peft: bool, where: str = "train.resume") -> Adaptation:
    """The accumulation that keeps the saved global batch on world_size ranks, or a SpecError naming the
    world sizes and micro-batches that would keep it."""
    if saved.strategy is not None and not compatible(saved.strategy, strategy):
        raise SpecError(where, f"the checkpoint was written by strategy {saved.strategy} and cannot be loaded by "
                               f"{strategy}; resume with strategy {saved.strategy} or start afresh (resume: never)")
    if saved.use_peft is not None and saved.use_peft != use_peft:
        raise SpecError(where, f"the checkpoint was written with use_peft: {str(saved.use_peft).lower()}; "
                               f"set use_peft: {str(saved.use_peft).lower()} or start afresh (resume: never)")
    g = saved.global_batch
    if g is None:
        return Adaptation(accum, world_size * micro_batch * accum, saved.total_steps, None, world_size, None)
    per_rank, rest = divmod(g, micro_batch * world_size)
    if rest or per_rank < 1:
        worlds = [w for w in range(1, g // micro_batch + 1) if (g // micro_batch) % w == 0] if g % micro_batch == 0 else []
        micros = [m for m in range(1, g // world_size + 1) if g % (m * world_size) == 0]
        fix = []
        if worlds:
            fix.append(f"run on {_some(worlds)} ranks")
        if micros:
            fix.append(f"set train.batch_size_training to {_some(micros)}")
        raise SpecError(where, f"the checkpoint's global batch of {g} ({saved.world_size} ranks x micro-batch "
                               f"{saved.micro_batch} x accumulation {saved.accum}) cannot be kept on {world_size} "
                               f"ranks with micro-batch {micro_batch}; " + (" or ".join(fix) or "start afresh"))
    return Adaptation(per_rank, g, saved.total_steps, saved.world_size, world_size, saved.accum)


def elastic_gaps(*, accum: int, counts: list[int]) -> tuple[list[tuple[int, int]], int]:
    """For a node range: the (start, restart) node counts whose global batch a requeued restart cannot
    keep (accum x start must divide by restart; micro-batch and ranks per node cancel out), and the
    smallest accumulation >= accum that keeps it for every pair."""
    gaps = [(a, b) for a in counts for b in counts if (accum * a) % b]
    fit = next(n for n in range(accum, accum * math.lcm(*counts) + 1) if all((n * a) % b == 0 for a in counts
                                                                           for b in counts))
    return gaps, fit


def _some(values: list[int], most: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:most])
    return shown + (", ..." if len(values) > most else "")
