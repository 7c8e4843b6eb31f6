"""The stage commands as a user meets them: a fast --help, dataset names, and params.yaml
errors that name the key (and the closest valid one) or the bad value."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from stages import convert_section, load_params

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "pandas", "pyarrow", "matplotlib", "sentence_transformers", "httpx", "PIL")


def _stages(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})


def test_help_imports_no_heavy_module():
    probe = ("import runpy, sys\nsys.argv = ['stages', '--help']\n"
             "try:\n    runpy.run_module('stages', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "download" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("command", ["train", "evaluate", "crawl", "align", "extract-text"])
def test_unknown_dataset_lists_valid_names(tmp_path, command):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    done = _stages(command, "fb15k", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown dataset 'fb15k'; valid: db15k, mkg-w, mkg-y"


def test_unknown_top_level_key_names_the_closest(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["trian"] = params.pop("train")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = _stages("evaluate", "mkg-w", cwd=tmp_path)
    assert done.returncode == 2 and "unknown key 'trian'; did you mean 'train'?" in done.stderr
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key 'trian'; did you mean 'train'\?"):
        load_params(tmp_path / "params.yaml", "evaluate")


def test_section_values_name_key_and_value():
    converters = {"batch_size": int, "dtype": str}
    assert convert_section("extract_text", {"batch_size": "8", "dtype": "float16"}, converters) == {"batch_size": 8, "dtype": "float16"}
    with pytest.raises(ConfigError, match=r"extract_text.batch_size: bad value 'big'"):
        convert_section("extract_text", {"batch_size": "big", "dtype": "float16"}, converters)
    with pytest.raises(ConfigError, match=r"unknown key 'extract_text.dtpye'; did you mean 'extract_text.dtype'\?"):
        convert_section("extract_text", {"batch_size": 8, "dtpye": "float16"}, converters)
    with pytest.raises(ConfigError, match=r"extract_text.dtype is missing"):
        convert_section("extract_text", {"batch_size": 8}, converters)


def test_unknown_sampler_option_names_the_closest():
    from stages.train import check_sampler_section

    with pytest.raises(ConfigError, match=r"unknown key 'sampler.uniform.exclude_positive'; did you mean 'sampler.uniform.exclude_positives'\?"):
        check_sampler_section({"name": "uniform", "seed": 1, "uniform": {"exclude_positive": True}})
    check_sampler_section({"name": "uniform", "seed": 1, "uniform": {"exclude_positives": True}})


def test_every_section_of_the_committed_params_is_accepted():
    """The repository's params.yaml passes every stage's key check."""
    from stages.evaluate import check_evaluate_section
    from stages.extract_text import text_settings
    from stages.extract_visual import visual_settings
    from stages.train import check_sampler_section, check_train_section

    params = load_params(REPO / "params.yaml")
    check_train_section(params["train"])
    for name in params["sampler"]:
        if isinstance(params["sampler"][name], dict):  # every sampler's committed options, as if selected
            check_sampler_section({**params["sampler"], "name": name})
    check_evaluate_section(params["evaluate"])
    text_settings(params["extract_text"])
    visual_settings(params["extract_visual"])
