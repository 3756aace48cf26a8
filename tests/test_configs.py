"""The shipped experiment configs: schema check and a test-mode run of each."""

import subprocess
import sys

import pytest
import yaml

import run
from conftest import ROOT

CONFIGS = sorted(path.name for path in ROOT.glob("*.yaml"))
# Determined 0.38.1's experiment-config checker, present beside a developer's checkout and in CI.
EXPCONF_CHECK = ROOT.parent / "shared" / "tools" / "expconf_check.py"


def test_every_required_config_ships():
    for name in ("supclr_train_eval.yaml", "supclr.yaml", "simclr_train_eval.yaml", "simclr.yaml"):
        assert name in CONFIGS


@pytest.mark.skipif(not EXPCONF_CHECK.is_file(), reason="the expconf checker is not present")
@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_expconf_check(name):
    result = subprocess.run(
        [sys.executable, str(EXPCONF_CHECK), "--complete", str(ROOT / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK {ROOT / name}" in result.stdout


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_in_test_mode(name, local_storage, tmp_path):
    metrics_file = tmp_path / "metrics.json"
    run.main(
        [
            "--config",
            str(ROOT / name),
            "--test-mode",
            "--set",
            "data.dataset=synthetic",
            "--set",
            "hyperparameters.backbone=resnet18",
            "--set",
            "hyperparameters.width=0.125",
            "--set",
            "hyperparameters.global_batch_size=16",
            "--metrics-file",
            str(metrics_file),
        ]
    )
    assert metrics_file.is_file()


@pytest.mark.parametrize("name", CONFIGS)
def test_config_entrypoint_names_trial(name):
    config = yaml.safe_load((ROOT / name).read_text())
    spec = run.trial_spec_from_entrypoint(config)
    assert spec is not None
    assert run.load_trial_class(spec).__name__ in config["entrypoint"]
    assert config["entrypoint"].startswith("python3 -m determined.launch.torch_distributed")


@pytest.mark.parametrize("name", ["supclr.yaml", "simclr.yaml"])
def test_cifar_recipe_values(name):
    hparams = yaml.safe_load((ROOT / name).read_text())["hyperparameters"]
    assert hparams["global_batch_size"] == 1024
    assert hparams["epochs"] == 1000
    assert hparams["learning_rate"] == 0.5
    assert hparams["temperature"] == (0.1 if name.startswith("supclr") else 0.5)


def test_startup_hook_installs_only_missing(tmp_path):
    # A stand-in python3 that lacks scikit-learn, has a torch stack, and records pip calls.
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    log = tmp_path / "calls.log"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {log}\n'
        'if [[ "$1" == "-c" && "$2" == "import sklearn" ]]; then exit 1; fi\n'
        'if [[ "$*" == "-m pip freeze" ]]; then\n'
        "  printf 'numpy==1.26.4\\ntorch==2.3.1\\ntorchvision==0.18.1\\nrequests==2.0\\n'\n"
        "fi\n"
    )
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    result = subprocess.run(
        ["bash", str(ROOT / "startup-hook.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in log.read_text().splitlines() if "pip install" in line]
    assert len(installs) == 1
    assert installs[0].endswith("scikit-learn==1.9.1")
    assert "--constraint" in installs[0]
    assert "torch" not in installs[0].split("--constraint")[1].split()[1:]
