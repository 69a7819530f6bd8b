"""Property tests: whatever users put in names, paths and env values, the rendered script is valid
bash, passes shellcheck, and hands the value over unchanged without running any of it."""
import subprocess

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpcft.errors import SpecError
from hpcft.render import render_sbatch
from tests.shell import logical_lines
from hpcft.spec import spec_from_dict

NASTY = st.text(alphabet=st.one_of(st.sampled_from(list(" '\"$`;\\\n\t()|&<>*?!#~{}[]=%")),
                                   st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
                max_size=30)


def render_or_none(data):
    try:
        return render_sbatch(spec_from_dict(data))
    except SpecError:
        return None  # refused with a clear error: also a safe outcome


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
# Output paths go into #SBATCH --output: Slurm's own parser, so hpcft refuses quotes, %, \ and control
# characters there (tested below); everything else, spaces and $() included, must survive.
PATHS = st.text(alphabet=st.one_of(st.sampled_from(list(" '$`;\n()|&<>*?!#~{}[]=")),
                                   st.characters(min_codepoint=33, max_codepoint=0x2FF,
                                                 blacklist_characters='"%\\\x7f')), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=NASTY, path=NASTY, outdir=PATHS, name=NAMES)
def test_rendered_scripts_are_valid_shellcheck_clean_and_inert(value, path, outdir, name, tmp_path_factory):
    assume(path and "\n" not in outdir)
    script = render_or_none({"name": name, "output_dir": outdir, "env": {"USER_VALUE": value},
                             "train": {"data_path": path, "model_name": path}})
    assert script is not None
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    sc = subprocess.run(["shellcheck", "-s", "bash", "-S", "warning", "-"], input=script, text=True, capture_output=True)
    assert sc.returncode == 0, sc.stdout
    cwd = tmp_path_factory.mktemp("exec")
    export = next(x for x in logical_lines(script) if x.startswith("export USER_VALUE="))
    out = subprocess.run(["bash", "-c", export + '\nprintf %s "$USER_VALUE"'], capture_output=True, cwd=cwd)
    assert out.stdout == value.encode() and list(cwd.iterdir()) == []  # bytes: text mode would turn \r into \n


@settings(max_examples=100, deadline=None)
@given(name=NASTY, outdir=NASTY)
def test_names_and_output_dirs_are_either_plain_or_refused(name, outdir):
    try:
        spec = spec_from_dict({"name": name, "output_dir": outdir})
    except SpecError as exc:
        assert exc.field in ("name", "output_dir") and "\n" not in str(exc)
        return
    assert all(c.isalnum() or c in "_.-" for c in spec.name)
    assert not any(c in '"%\\' or ord(c) < 32 for c in spec.output_dir)


@pytest.mark.parametrize("name", ["HF_TOKEN", "WANDB_API_KEY", "DB_PASSWORD", "my_secret"])
def test_secrets_are_refused_in_specs(name):
    with pytest.raises(SpecError, match="keep it out of the spec") as exc:
        spec_from_dict({"env": {name: "abc"}})
    assert exc.value.field == f"env.{name}"
