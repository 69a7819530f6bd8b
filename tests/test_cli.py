"""The CLI as users run it, without a cluster: bad input is one line, exit 2, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HPCFT = [sys.executable, "-m", "hpcft.cli"]


def hpcft(*args, cwd, env=None):
    return subprocess.run([*HPCFT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_the_script_with_overrides(tmp_path):
    # --no-check: render without the model and data the spec names (they are not in tmp_path).
    proc = hpcft("submit", "--dry-run", "--no-check", str(ROOT / "jobs/samsum_tiny.yaml"), "--nodes", "3", "train.lr=3e-4",
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=3\n" in proc.stdout and "--lr=0.0003" in proc.stdout
    # Relative paths of the spec are resolved against the submit directory.
    assert f"--model_name={tmp_path}/artifacts/tiny-llama" in proc.stdout.replace(" \\\n  ", " ")
    assert not (tmp_path / "runs").exists()


def test_dry_run_submitit_prints_submitits_script_and_writes_nothing(tmp_path):
    proc = hpcft("submit", "--dry-run", "--no-check", "--backend", "submitit", str(ROOT / "jobs/samsum_tiny.yaml"), "--nodes", "2",
                 "--gpus-per-node", "3", "resources.time=00:30:00", "launch.signal_lead_s=90", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")
    lines = proc.stdout.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=3", "#SBATCH --signal=USR2@90", "#SBATCH --time=30",
                 "#SBATCH --job-name=samsum-tiny", "#SBATCH --requeue", "#SBATCH --ntasks-per-node=1"):
        assert line in lines, line
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1 --ntasks-per-node=1" in srun and "-m submitit.core._submit" in srun
    assert f"{tmp_path}/runs/samsum-tiny/submitit/%j" in srun
    assert list(tmp_path.iterdir()) == []


def test_user_command_after_double_dash(tmp_path):
    proc = hpcft("submit", "--dry-run", "--no-check", str(ROOT / "jobs/samsum_tiny.yaml"), "--", "my_train.py", "--my-arg", "a b",
                 cwd=tmp_path)
    assert proc.returncode == 0
    assert "-m hpcft.launch --node -- my_train.py --my-arg 'a b' \"$@\"" in proc.stdout.replace(" \\\n  ", " ")


def test_missing_model_fails_before_submission(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {"model_name": "no/such/model"}}))
    env = dict(os.environ, PATH="/nonexistent")  # even sbatch being absent is never reached
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "train.model_name: no model directory" in proc.stderr
    assert "hpcft make-tiny-model" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_field_one_line_exit_2(tmp_path):
    proc = hpcft("submit", str(ROOT / "jobs/samsum_tiny.yaml"), "--gpus-per-node", "many", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "hpcft: error: resources.gpus_per_node: must be an integer (got 'many')\n"


def test_launch_outside_allocation(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = hpcft("launch", "--", "-m", "hpcft.train", cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "not inside a Slurm allocation" in proc.stderr


def test_logs_of_unknown_run(tmp_path):
    proc = hpcft("logs", "12345", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2 and "no run directory" in proc.stderr


def test_make_tiny_model_bad_shape(tmp_path):
    proc = hpcft("make-tiny-model", str(tmp_path / "m"), "--hidden-size", "130", cwd=tmp_path)
    assert proc.returncode == 2 and "--hidden-size" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_qlora_without_bitsandbytes_fails_before_submission(tmp_path, tiny_model):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "train": {"model_name": str(tiny_model), "use_peft": True, "quantization": "4bit",
                                              "data_path": str(ROOT / "data/samsum_tiny.jsonl")}}))
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 2 and "train.quantization" in proc.stderr and "bitsandbytes" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_relative_paths_resolve_against_the_submit_directory(tmp_path):
    (tmp_path / "ds.json").write_text("{}")
    proc = hpcft("submit", "--dry-run", "--no-check", str(ROOT / "jobs/zero3_tiny.yaml"), "train.deepspeed_config=ds.json",
                 "train.resume=old/checkpoints/step-00000010", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.replace(" \\\n  ", " ")
    assert f"--deepspeed_config={tmp_path}/ds.json" in text
    assert f"--resume={tmp_path}/old/checkpoints/step-00000010" in text


BAD_DATA = {
    "malformed": ('{"dialogue": "a", "summary": "b"}\n{"dialogue": "a", "summary": \n', "train.data_path",
                  "data.jsonl:2 is not valid JSON"),
    "missing-column": ('{"dialogue": "a", "summary": "b"}\n{"dialogue": "only"}\n', "train.data_path",
                       "data.jsonl: lacks the text column summary"),
    "empty": ("\n\n", "train.data_path", "holds no examples"),
    "unknown-form": ('{"question": "hello"}\n', "train.data_path", "cannot tell the data form"),
    "chat-without-assistant": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "train.data_path",
                               "has no assistant turn"),
    "chat-bad-turn": ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}\n', "train.data_path",
                      "turn 1 needs a text role and text content"),
    "too-long": ('{"dialogue": "' + "word " * 400 + '", "summary": "b"}\n', "train.context_length",
                 "no room for its answer in context_length 256"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_at_submit_with_one_line(tmp_path, tiny_model, case):
    text, field, message = BAD_DATA[case]
    (tmp_path / "data.jsonl").write_text(text)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "train": {
        "model_name": str(tiny_model), "data_path": "data.jsonl", "dataset": "auto"}}))
    proc = hpcft("submit", str(spec), cwd=tmp_path, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"hpcft: error: {field}: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Everything the login node can check is checked before the queue, by submit and --dry-run alike.


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _checkpoint(run: Path, step: int, *, engine: str, **state) -> Path:
    """A complete checkpoint as hpcft writes it: trainer_state.json plus dcp/.metadata or zero/."""
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    (ckpt / engine).mkdir(parents=True)
    if engine == "dcp":
        (ckpt / "dcp" / ".metadata").write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0, **state}))
    return ckpt


SHAPE = {"world_size": 4, "micro_batch": 4, "accum": 1, "strategy": "ddp", "use_peft": False, "total_steps": 40}
LATIN1 = '{"dialogue": "a", "summary": "b"}\n'.encode() * 2502 + '{"dialogue": "café", "summary": "b"}\n'.encode("latin-1")
SINFO_V100 = "#!/bin/sh\necho 'n1|8|gpu:v100:4|debug*|idle|16000'\necho 'n2|8|gpu:v100:4|debug*|idle|16000'\n"

# case -> (spec fields, files to write (name -> text or bytes), extra args, field, message)
BAD_INPUT = {
    "ds-json-syntax": ({"train": {"strategy": "zero2", "deepspeed_config": "ds.json"}},
                       {"ds.json": '{"train_batch_size": "auto",\n  "zero_optimization": {"stage": 2,}\n}'}, [],
                       "train.deepspeed_config", "is not valid JSON at line 2 column 36 (Expecting property name enclosed in double quotes)"),
    "ds-unknown-auto": ({"train": {"strategy": "zero2", "deepspeed_config": "ds.json"}},
                        {"ds.json": '{"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}'}, [],
                        "train.deepspeed_config", '"optimizer.params.lr": "auto" is not a field hpcft fills'),
    "resume-missing": ({"train": {"resume": "old/checkpoints/step-00000010"}}, {}, [], "train.resume",
                       "is not a complete checkpoint (no trainer_state.json)"),
    "resume-half-written": ({"train": {"resume": "old/checkpoints/step-00000010"}},
                            {"old/checkpoints/step-00000010/trainer_state.json": "{}"}, [], "train.resume",
                            "is not a complete checkpoint (no dcp/.metadata or zero/)"),
    "resume-other-strategy": ({"train": {"resume": "old/checkpoints/step-00000010", "strategy": "fsdp"}},
                              {"old/checkpoints/step-00000010": ("zero", SHAPE)}, [], "train.resume",
                              "holds a ZeRO (zero/) checkpoint, which strategy fsdp cannot load"),
    "resume-world-size": ({"resources": {"nodes": 1, "gpus_per_node": 3},
                           "train": {"resume": "old/checkpoints/step-00000010"}},
                          {"old/checkpoints/step-00000010": ("dcp", SHAPE)}, [], "train.resume",
                          "global batch of 16 (4 ranks x micro-batch 4 x accumulation 1) cannot be kept on 3 ranks"),
    "resume-range": ({"resources": {"nodes": "1-3", "gpus_per_node": 2},
                      "train": {"resume": "old/checkpoints/step-00000010"}},
                     {"old/checkpoints/step-00000010": ("dcp", SHAPE)}, [], "train.resume",
                     "cannot be kept on 6 ranks"),
    "resume-latest": ({"train": {"resume": "latest", "strategy": "zero3"}},
                      {"out/job/1234/checkpoints/step-00000010": ("dcp", SHAPE)}, [], "train.resume", "which strategy zero3 cannot load"),
    "lora-targets": ({"train": {"use_peft": True, "lora_target_modules": ["q_proj", "query_key_value"]}}, {}, [],
                     "train.lora_target_modules", "query_key_value not in"),
    "no-model": ({"train": {"model_name": "no/such/model"}}, {}, [], "train.model_name", "no model directory"),
    "not-utf8": ({"train": {"data_path": "latin1.jsonl"}}, {"latin1.jsonl": LATIN1}, [], "train.data_path",
                 "latin1.jsonl:2503 is not UTF-8 (byte 0xe9 at offset 85085)"),
    "eval-not-utf8": ({"train": {"eval_data_path": "latin1.jsonl"}}, {"latin1.jsonl": LATIN1}, [],
                      "train.eval_data_path", "latin1.jsonl:2503 is not UTF-8"),
    "duplicate-key": ("name: job\ntrain:\n  lr: 1e-4\n  lr: 3e-4\n", {}, [], "train.lr",
                      "s.yaml (lines 3 and 4); keep one"),
    "empty-spec": ("# only a comment\n", {}, [], "spec", "s.yaml is empty"),
    "list-spec": ("- nodes: 2\n", {}, [], "spec", "must hold a YAML mapping"),
    "slurm-time": ({"resources": {"time": "25:99:99"}}, {}, [], "resources.time", "minutes must be < 60 in '25:99:99'"),
    "node-range": ({"resources": {"nodes": "4-2"}}, {}, [], "resources.nodes", "min <= max"),
    "gpu-type": ({"resources": {"gpus_per_node": "a100:4"}}, {"bin/sinfo": SINFO_V100}, [], "resources.gpu_type",
                 "no node in the default partition has a100 GPUs (GPU types there: v100; use one of them)"),
    "data-missing": ({"train": {"data_path": "nope/train.jsonl"}}, {}, [], "train.data_path",
                     "no such file or directory"),
    "data-file-type": ({"train": {"data_path": "data.xlsx"}}, {"data.xlsx": "x"}, [], "train.data_path",
                       "unknown file type .xlsx"),
    "data-unreadable": ({"train": {"data_path": "data.parquet"}}, {"data.parquet": b"PAR1 not parquet"}, [],
                        "train.data_path", "datasets cannot read"),
    "custom-function": ({"train": {"dataset": "custom", "custom_dataset": "loader.py:nope"}},
                        {"loader.py": "def get_custom_dataset(dataset_config, tokenizer, split):\n    return []\n"}, [],
                        "train.custom_dataset", "defines no function nope"),
    "prepare-time": ({"prepare": {"time": "25:99:99"}}, {}, [], "prepare.time", "minutes must be < 60"),
    # llama-recipes' flags after `--` (training flags over the spec's train section)
    "recipes-typo": ({}, {}, ["--", "--enable_fdsp", "--pure_bf16"], "train.enable_fdsp", "did you mean --enable_fsdp?"),
    "recipes-refused": ({}, {}, ["--", "--enable_fsdp", "--fsdp_config.fsdp_cpu_offload"],
                        "train.fsdp_config.fsdp_cpu_offload", "--strategy zero3 --offload_params true"),
    "recipes-conflict": ({"train": {"strategy": "zero3"}}, {}, ["--", "--enable_fsdp", "--strategy", "zero2"],
                         "train.enable_fsdp", "conflicts with --strategy zero2"),
    "export-dir-taken": ({}, {"mine/notes.txt": "not a model"}, ["--", "--use_peft", "--output_dir", "mine"],
                         "train.export_dir", "holds files that are not an earlier model export"),
}


def _bad_input_case(case: str, tmp_path: Path, tiny_model: Path) -> tuple[Path, dict, list[str], str, str]:
    spec_fields, files, extra, field, message = BAD_INPUT[case]
    for name, content in files.items():
        path = tmp_path / name
        if isinstance(content, tuple):  # a checkpoint: (engine state dir, trainer_state fields)
            engine, state = content
            (path / engine).mkdir(parents=True)
            if engine == "dcp":
                (path / "dcp" / ".metadata").write_bytes(b"x")
            (path / "trainer_state.json").write_text(json.dumps({"step": 10, "epoch": 0, **state}))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        if name.startswith("bin/"):
            path.chmod(0o755)
    spec = tmp_path / "s.yaml"
    if isinstance(spec_fields, str):
        spec.write_text(spec_fields)
    else:
        train = {"model_name": str(tiny_model), "data_path": str(ROOT / "data/samsum_tiny.jsonl"),
                 **spec_fields.get("train", {})}
        spec.write_text(yaml.safe_dump({**spec_fields, "name": "job", "output_dir": "out", "train": train}))
    env = dict(os.environ, PATH=str(tmp_path / "bin"))  # no sbatch anywhere; sinfo only where a case fakes it
    return spec, env, extra, field, message


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "submit"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_before_the_queue(tmp_path, tiny_model, case, dry_run):
    """Exit 2, one line naming the field and the fix, and nothing written: no output_dir, no run
    directory, no file of any kind (sbatch is not on PATH: reaching it would be a different error)."""
    spec, env, extra, field, message = _bad_input_case(case, tmp_path, tiny_model)
    before = _tree(tmp_path)
    proc = hpcft("submit", *(["--dry-run"] if dry_run else []), str(spec), *extra, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"hpcft: error: {field}: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert _tree(tmp_path) == before


def test_no_check_renders_without_the_model(tmp_path):
    spec, env, _, _, _ = _bad_input_case("no-model", tmp_path, tmp_path / "absent")
    proc = hpcft("submit", "--dry-run", "--no-check", str(spec), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n") and proc.stderr == ""


def test_dry_run_without_slurm_checks_the_rest_and_says_what_it_skipped(tmp_path, tiny_model):
    spec, env, _, _, _ = _bad_input_case("no-model", tmp_path, tiny_model)
    spec.write_text(yaml.safe_dump({"name": "job", "output_dir": "out", "resources": {"nodes": "2-4"},
                                    "train": {"model_name": str(tiny_model), "use_peft": True,
                                              "gradient_accumulation_steps": 12,
                                              "data_path": str(ROOT / "data/samsum_tiny.jsonl")}}))
    proc = hpcft("submit", "--dry-run", str(spec), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=2-4\n" in proc.stdout
    assert proc.stderr.startswith("hpcft: note: sinfo did not answer") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # Accumulation 1 on 2-4 nodes: a run started on 2 and requeued onto 3 could not keep its global batch.
    spec.write_text(spec.read_text().replace("gradient_accumulation_steps: 12", "gradient_accumulation_steps: 1"))
    proc = hpcft("submit", "--dry-run", str(spec), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("hpcft: note: resources.nodes 2-4: a run started on 2 node(s) and requeued onto 3 "
                                  "cannot keep its global batch"), proc.stderr
    assert "12 keeps it for every node count of the range" in proc.stderr


def test_login_node_checks_import_no_torch(tmp_path, tiny_model):
    """Every check before the queue (model header, LoRA targets, DeepSpeed JSON, resume, data) runs
    without importing torch, transformers, datasets or deepspeed: seconds on a login node."""
    (tmp_path / "ds.json").write_text('{"train_batch_size": "auto"}')
    ckpt = tmp_path / "out/job/7/checkpoints/step-00000010"
    (ckpt / "zero").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({**SHAPE, "strategy": "zero3", "use_peft": True, "step": 10}))
    spec = {"name": "job", "output_dir": str(tmp_path / "out"), "train": {
        "model_name": str(tiny_model), "data_path": str(ROOT / "data/samsum_tiny.jsonl"), "strategy": "zero3",
        "deepspeed_config": str(tmp_path / "ds.json"), "use_peft": True, "resume": "latest"}}
    code = ("import sys; from hpcft.spec import spec_from_dict; from hpcft.submit import check_before_queue; "
            f"check_before_queue(spec_from_dict({spec!r})); "
            "print(*[m in sys.modules for m in ('torch', 'transformers', 'datasets', 'deepspeed')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PATH="/nonexistent")).stdout
    assert out.split() == ["False"] * 4


def test_prepare_fills_the_cache_once_and_dry_run_prepare_prints_both_jobs(tmp_path, tiny_model):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "job", "output_dir": "out", "train": {
        "model_name": str(tiny_model), "data_path": str(ROOT / "data/chat_tiny.jsonl"), "batching_strategy": "packing"}}))
    proc = hpcft("submit", "--dry-run", "--prepare", str(spec), cwd=tmp_path, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 0, proc.stderr
    prepare_script, train_script = proc.stdout.split("# ---- then the training job", 1)
    assert "#SBATCH --job-name=job-prepare" in prepare_script and "-m hpcft.prepare" in prepare_script
    assert "-m hpcft.train" in train_script and not (tmp_path / "out").exists()
    first = hpcft("prepare", str(spec), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "tokenized now" in first.stdout and "240 examples" in first.stdout and "(chat)" in first.stdout
    assert first.stderr.count("hpcft.prepare: tokenizing") == 1
    again = hpcft("prepare", str(spec), cwd=tmp_path)
    assert again.returncode == 0 and "already there" in again.stdout and "tokenizing" not in again.stderr
    entries = [p for p in (tmp_path / "out" / "data-cache").iterdir() if p.name != "fingerprints"]
    assert len(entries) == 1
    bad = hpcft("prepare", str(spec), "train.dataset=alpaca", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("hpcft: error: train.data_path: dataset=alpaca needs column(s) instruction, output")


def test_every_flag_of_every_command_has_help():
    from hpcft.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "cmd").choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, sub in commands.items()
               for action in sub._actions if action.dest != "help" and not action.help]
    assert missing == []
    assert set(commands) >= {"submit", "prepare", "launch", "doctor", "logs", "status", "cancel", "make-tiny-model"}
