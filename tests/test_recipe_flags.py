"""llama-recipes' command lines, as its multi-GPU guide writes them, read by the shared entrypoint's flag
parser (hpcft.train.recipe_flags): every torchrun line of the guide, both flag forms, its configs' dotted
names, what hpcft refuses and why, and where the model goes. The lines train on the cluster in
tests/integration/test_seed_guides.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcft.errors import SpecError
from hpcft.paths import RunPaths
from hpcft.train.config import TrainConfig, parse_args, parse_flags

ROOT = Path(__file__).resolve().parents[1]
MODEL = "/path_of_model_folder/8B"

# The guide's torchrun lines (../shared/seeds: "Fine-tuning with Multi GPU"), the flags after finetuning.py
# as written there, and what hpcft must make of each.
GUIDE = {
    "fsdp-peft": ("--enable_fsdp --model_name /path_of_model_folder/8B --use_peft --peft_method lora "
                  "--output_dir Path/to/save/PEFT/model",
                  dict(strategy="fsdp", use_peft=True, precision="fp32", export_dir="Path/to/save/PEFT/model")),
    "fast-kernels": ("--enable_fsdp --model_name /path_of_model_folder/8B --use_peft --peft_method lora "
                     "--output_dir Path/to/save/PEFT/model --use_fast_kernels",
                     dict(strategy="fsdp", use_peft=True, attn_implementation="sdpa",
                          export_dir="Path/to/save/PEFT/model")),
    "fsdp-only": ("--enable_fsdp --model_name /path_of_model_folder/8B --dist_checkpoint_root_folder "
                  "model_checkpoints --dist_checkpoint_folder fine-tuned --pure_bf16 --use_fast_kernels",
                  dict(strategy="fsdp", use_peft=False, precision="pure_bf16",
                       export_dir="model_checkpoints/fine-tuned-/path_of_model_folder/8B")),
    "70b": ("--enable_fsdp --low_cpu_fsdp --pure_bf16 --model_name /path_of_model_folder/70B --batch_size_training 1 "
            "--dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder fine-tuned",
            dict(strategy="fsdp", low_cpu_fsdp=True, precision="pure_bf16", batch_size_training=1,
                 export_dir="model_checkpoints/fine-tuned-/path_of_model_folder/70B")),
    "grammar": ("--enable_fsdp  --model_name /path_of_model_folder/8B --use_peft --peft_method lora --dataset "
                "grammar_dataset --save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
                "fine-tuned  --pure_bf16 --output_dir Path/to/save/PEFT/model",
                dict(dataset="grammar", use_peft=True, save_model=True, precision="pure_bf16",
                     export_dir="Path/to/save/PEFT/model")),
    "alpaca": ("--enable_fsdp  --model_name /path_of_model_folder/8B --use_peft --peft_method lora --dataset "
               "alpaca_dataset --save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
               "fine-tuned --pure_bf16 --output_dir Path/to/save/PEFT/model",
               dict(dataset="alpaca", use_peft=True, precision="pure_bf16", export_dir="Path/to/save/PEFT/model")),
    "samsum": ("--enable_fsdp --model_name /path_of_model_folder/8B --use_peft --peft_method lora --dataset "
               "samsum_dataset --save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
               "fine-tuned --pure_bf16 --output_dir Path/to/save/PEFT/model",
               dict(dataset="samsum", use_peft=True, precision="pure_bf16", export_dir="Path/to/save/PEFT/model")),
}


@pytest.mark.parametrize("line", list(GUIDE))
def test_every_guide_line_is_read_as_its_guide_means_it(line):
    flags, expected = GUIDE[line]
    cfg, notes = parse_flags(flags.split())
    cfg.validate()
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert cfg.model_name.startswith("/path_of_model_folder/")
    assert any(n.startswith("--enable_fsdp -> strategy=fsdp") for n in notes)
    # Both forms, as fire reads them: --name=value gives the same config.
    assert parse_args(equals_form(flags.split())) == cfg


def equals_form(words: list[str]) -> list[str]:
    """--name value --flag -> --name=value --flag"""
    out = []
    for word in words:
        if out and not word.startswith("--") and "=" not in out[-1]:
            out[-1] += "=" + word
        else:
            out.append(word)
    return out


def test_a_peft_line_says_its_checkpoint_folders_go_unused():
    cfg, notes = parse_flags(GUIDE["samsum"][0].split())
    assert any("unused with use_peft" in n for n in notes), notes
    assert cfg.export_dir == "Path/to/save/PEFT/model"


def test_fire_forms_bare_booleans_and_no_prefix():
    cfg = parse_args(["--use_peft", "--save_model", "false", "--run_validation=False", "--nouse_peft"])
    assert cfg.use_peft is False and cfg.save_model is False and cfg.run_validation is False
    assert parse_args(["--use_peft", "true", "--lr", "-1e-4"]).lr == -1e-4  # a negative number is a value
    assert parse_args(["--num-epochs", "2"]).num_epochs == 2  # dashes are underscores, as fire reads them


def test_configs_dotted_names_and_plain_names():
    cfg, notes = parse_flags("--fsdp_config.sharding_strategy ShardingStrategy.HYBRID_SHARD --fsdp_config.pure_bf16 "
                             "--dataset custom_dataset --custom_dataset.file loader.py:get_rows --lora_config.r 4 "
                             "--target_modules [q_proj,k_proj] --fsdp_config.fsdp_activation_checkpointing "
                             "--fsdp_config.checkpoint_type StateDictType.SHARDED_STATE_DICT "
                             "--grammar_dataset.train_split data/grammar_tiny.csv --use_wandb".split())
    assert (cfg.sharding_strategy, cfg.precision, cfg.dataset, cfg.custom_dataset) == \
        ("HYBRID_SHARD", "pure_bf16", "custom", "loader.py:get_rows")
    assert (cfg.lora_r, cfg.lora_target_modules, cfg.activation_checkpointing) == (4, ("q_proj", "k_proj"), True)
    assert cfg.data_path == "data/grammar_tiny.csv" and cfg.report_to == ("wandb",)
    assert len(notes) == 10, notes  # one per llama-recipes name given


@pytest.mark.parametrize("flags, precision", [("--mixed_precision", "bf16"), ("--mixed_precision --use_fp16", "fp16"),
                                              ("--use_fp16 --pure_bf16", "pure_bf16"), ("--mixed_precision=false", "fp32"),
                                              ("", "fp32")])
def test_precision_flags_resolve_as_llama_recipes_policies(flags, precision):
    assert parse_args(flags.split()).precision == precision


def test_model_folder_follows_the_guide_layout():
    full = parse_args("--enable_fsdp --model_name meta-llama/Llama-3.1-8B --dist_checkpoint_root_folder ck".split())
    assert full.export_dir == "ck/fine-tuned-meta-llama/Llama-3.1-8B"  # folder's default, model name as written
    ddp = parse_args("--model_name m --output_dir out --dist_checkpoint_root_folder ck".split())
    assert ddp.export_dir == "out"  # no FSDP, no PEFT: llama-recipes saves to output_dir
    neither = parse_args("--enable_fsdp --output_dir out".split())
    assert neither.export_dir is None  # a full FSDP model without a root folder: the run directory's model/


@pytest.mark.parametrize("flags, field, says", [
    ("--enable_fdsp", "train.enable_fdsp", "did you mean --enable_fsdp?"),
    ("--pure_bf61", "train.pure_bf61", "did you mean --pure_bf16?"),
    ("--fsdp_config.fsdp_cpu_offload", "train.fsdp_config.fsdp_cpu_offload", "--offload_params"),
    ("--gamma 0.85", "train.gamma", "--lr_scheduler"),
    ("--one_gpu", "train.one_gpu", "--nproc_per_node 1"),
    ("--freeze_layers --num_freeze_layers 2", "train.freeze_layers", "--use_peft"),
    ("--peft_method llama_adapter", "train.peft_method", "lora"),
    ("--fsdp_config.foo 1", "train.fsdp_config.foo", "fsdp_config has no field foo"),
    ("--fsdp_conf.pure_bf16", "train.fsdp_conf.pure_bf16", "not one of llama-recipes' configs"),
    ("--enable_fsdp --strategy zero3", "train.enable_fsdp", "conflicts with --strategy zero3"),
    ("--pure_bf16 --precision bf16", "train.precision", "conflicts with --pure_bf16"),
    ("--model_name", "train.model_name", "needs a value"),
    ("--dataset llamaguard_toxicchat_dataset", "train.dataset", "dataset chat"),
    ("--checkpoint_type LOCAL", "train.checkpoint_type", "SHARDED_STATE_DICT or FULL_STATE_DICT"),
    ("examples/finetuning.py --enable_fsdp", "examples/finetuning.py", "--name value or --name=value"),
])
def test_what_hpcft_cannot_honour_is_one_line_naming_the_nearest_field(flags, field, says):
    with pytest.raises(SpecError) as exc:
        parse_flags(flags.split())[0].validate()
    assert exc.value.field == field and says in str(exc.value), str(exc.value)


def test_flags_apply_over_a_spec_train_section():
    base = TrainConfig(strategy="zero3", lr=3e-4, data_path="data/alpaca_tiny.jsonl")
    cfg, _ = parse_flags(["--enable_fsdp", "--batch_size_training", "2"], base=base)
    assert (cfg.strategy, cfg.lr, cfg.batch_size_training, cfg.data_path) == ("fsdp", 3e-4, 2, "data/alpaca_tiny.jsonl")


def test_to_args_round_trips_the_new_fields():
    cfg = TrainConfig(export_dir="out/model", profiler_dir="prof")
    assert parse_args(cfg.to_args()) == cfg


def test_a_typo_ends_the_node_launcher_before_torchrun_with_one_line(tmp_path):
    """What sbatch slurm/multi_node.slurm runs on every node: the flags are read before torchrun, the
    job's run directory says why, and `hpcft logs` shows it as the job's failure."""
    run = tmp_path / "out" / "hpcft" / "77"
    run.mkdir(parents=True)
    env = dict(os.environ, HPCFT_RUN_DIR=str(run), SLURM_NODEID="0", PATH="/nonexistent")  # no torchrun either
    proc = subprocess.run([sys.executable, "-m", "hpcft.launch", "--node", "--", "-m", "hpcft.train",
                           "--enable_fdsp", "--pure_bf16"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "hpcft.train: error: train.enable_fdsp: unknown flag (did you mean --enable_fsdp?)\n"
    assert RunPaths(run).refused.read_text() == proc.stderr
    logs = subprocess.run([sys.executable, "-m", "hpcft.cli", "logs", "--failure-only", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert logs.returncode == 1 and "refused before any rank started" in logs.stderr
    assert "did you mean --enable_fsdp?" in logs.stderr
    # Another node of the same job exits the same way without saying it again.
    other = subprocess.run([sys.executable, "-m", "hpcft.launch", "--node", "--", "-m", "hpcft.train", "--enable_fdsp"],
                           env={**env, "SLURM_NODEID": "1"}, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and other.stderr == ""


def test_submit_dry_run_takes_the_guide_line_after_the_separator(tmp_path, tiny_model):
    """`hpcft submit ... -- FLAGS`: the guide's flags over the defaults, rendered as hpcft's own flags; the
    mapping is said once on stderr; the model folder is made absolute against the submit directory."""
    flags = GUIDE["70b"][0].replace("/path_of_model_folder/70B", str(tiny_model)).split()
    proc = subprocess.run([sys.executable, "-m", "hpcft.cli", "submit", "--dry-run", "--nodes", "2",
                           "--gpus-per-node", "1", "--", *flags, "--data_path", str(ROOT / "data/samsum_tiny.jsonl")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout[proc.stdout.index("-m hpcft.train"):].split("\n\n")[0]
    export = tmp_path / f"model_checkpoints/fine-tuned-{tiny_model}"
    for want in ("--strategy=fsdp", "--low_cpu_fsdp=true", "--precision=pure_bf16", "--batch_size_training=1",
                 f"--export_dir={export}"):
        assert want in line, line
    assert "llama-recipes flag --enable_fsdp -> strategy=fsdp" in proc.stderr
    assert proc.stderr.count("llama-recipes flag") == 3, proc.stderr


def test_hpcft_launch_refuses_a_typo_before_srun(tmp_path):
    """In an allocation (salloc, an srun --pty shell): one line, exit 2, no srun (none is on PATH here)."""
    env = dict(os.environ, SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", PATH="/nonexistent")
    proc = subprocess.run([sys.executable, "-m", "hpcft.cli", "launch", "--output-dir", str(tmp_path), "--", "-m",
                           "hpcft.train", "--enable_fsdp", "--use_pef"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr == "hpcft: error: train.use_pef: unknown flag (did you mean --use_peft?)\n"
    assert not any(tmp_path.iterdir())  # no run directory made
