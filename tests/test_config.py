"""The configuration's checks: values out of range fail at load, naming the key or the `[[workers]]`
entry; the workers' model names are checked by the roles that start workers (`check_worker_models`),
from what is on disk and in the config, without loading a model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from casola.config import ConfigError, check_worker_models, load_config
from casola.roles import BUILTIN_MODELS, HEALTHY_RUN_S, RESTART_MAX_S, _restart_delay

__all__: list[str] = []


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "casola.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", ["0", "-1.0", "nan", "inf"])
def test_worker_ping_timeout_must_be_a_positive_number_of_seconds(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"worker_ping_timeout must be a positive number of seconds"):
        load_config(_write(tmp_path, f"[queue]\nworker_ping_timeout = {value}\n"))


def test_worker_ping_timeout_is_loaded(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, "[queue]\nworker_ping_timeout = 0.5\n"))
    assert config.queue.worker_ping_timeout == 0.5


def test_a_workers_pool_typo_names_the_entry(tmp_path: Path) -> None:
    path = _write(tmp_path, '[[workers]]\nmodels = ["echo"]\n\n[[workers]]\nmodels = ["steps"]\npool = "shraed"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: [[workers]] #2: pool 'shraed' is not one of sync, async, shared"


@pytest.mark.parametrize("key", ["count", "capacity", "threads"])
def test_workers_counts_are_at_least_one(tmp_path: Path, key: str) -> None:
    path = _write(tmp_path, f"[[workers]]\n{key} = 0\n")
    with pytest.raises(ConfigError, match=rf"\[\[workers\]\] #1: {key} must be at least 1, not 0"):
        load_config(path)


def test_a_worker_without_models_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[\[workers\]\] #1: models must name at least one model"):
        load_config(_write(tmp_path, "[[workers]]\nmodels = []\n"))


def test_every_pool_loads(tmp_path: Path) -> None:
    entries = "".join(f'[[workers]]\npool = "{p}"\n' for p in ("sync", "async", "shared"))
    assert [w.pool for w in load_config(_write(tmp_path, entries)).workers] == ["sync", "async", "shared"]


# -- model names (checked by `casola up`, not at load) ------------------------------------------------


def _manifest(models: Path, name: str, kind: str = "llm") -> None:
    (models / name).mkdir(parents=True)
    (models / name / "casola.json").write_text(json.dumps({"kind": kind}))


def test_an_unknown_model_loads_but_fails_the_check_naming_what_is_available(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _manifest(models, "chat")
    (models / "not-a-model").mkdir()  # no casola.json: not offered
    text = (
        f'models_dir = "{models}"\n[[workers]]\nmodels = ["echo"]\n[[workers]]\nmodels = ["steps", "ehco"]\n'
        '[models.tts]\nkind = "tts"\n'
    )
    config = load_config(_write(tmp_path, text))  # the models directory may be prepared later
    with pytest.raises(ConfigError) as err:
        check_worker_models(config, BUILTIN_MODELS)
    message = str(err.value)
    assert message.startswith("[[workers]] #2: model 'ehco' is not built in, has no ")
    assert f"{models}/ehco/casola.json" in message and "[models.ehco]" in message
    assert message.endswith("; available: echo, steps, chat, tts")
    assert "\n" not in message


def test_built_in_directory_and_declared_models_pass_the_check(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _manifest(models, "chat", "llm")  # a directory whose weights are absent: the check loads nothing
    elsewhere = tmp_path / "voices"
    _manifest(elsewhere, "v1", "tts")
    text = (
        f'models_dir = "{models}"\n[[workers]]\nmodels = ["echo", "steps", "chat", "speak", "v1"]\n'
        f'[models.speak]\nkind = "tts"\n[models.v1]\npath = "{elsewhere / "v1"}"\n'
    )
    before = set(sys.modules)
    check_worker_models(load_config(_write(tmp_path, text)), BUILTIN_MODELS)
    loaded = {m for m in set(sys.modules) - before if m.startswith(("workers.llm", "workers.tts", "ctranslate2"))}
    assert not loaded, f"the check imported model code: {sorted(loaded)}"


def test_a_broken_manifest_fails_the_check(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _manifest(models, "odd", "painting")
    config = load_config(_write(tmp_path, f'models_dir = "{models}"\n[[workers]]\nmodels = ["odd"]\n'))
    with pytest.raises(ConfigError, match=r"\[\[workers\]\] #1: model 'odd' cannot be resolved: .*kind"):
        check_worker_models(config, BUILTIN_MODELS)


def test_the_default_config_passes_the_check() -> None:
    check_worker_models(load_config(None), BUILTIN_MODELS)


# -- restarts of local workers (`casola up`) ----------------------------------------------------------


def test_restarts_back_off_while_a_worker_keeps_crashing_and_reset_after_a_healthy_run() -> None:
    delays, previous = [], None
    for _ in range(8):
        previous = _restart_delay(previous, ran_s=0.2)
        delays.append(previous)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX_S, RESTART_MAX_S, RESTART_MAX_S]
    assert _restart_delay(RESTART_MAX_S, ran_s=HEALTHY_RUN_S) == 1.0
    assert _restart_delay(None, ran_s=0.0, first=0.25) == 0.25


# -- logging and metrics keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('log_level = "loud"\n', "log_level 'loud' is not one of debug, info, warning, error, critical"),
        ('log_format = "xml"\n', "log_format 'xml' is not one of text, json"),
        ('[queue]\nmetrics = "9110"\n', "metrics: '9110' is not host:port"),
    ],
)
def test_logging_and_metrics_keys_are_checked_at_load(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(_write(tmp_path, text))


def test_logging_and_metrics_keys_are_loaded(tmp_path: Path) -> None:
    text = 'log_level = "DEBUG"\nlog_format = "json"\naccess_log = true\nmetrics_key = true\n'
    config = load_config(_write(tmp_path, text + '[queue]\nmetrics = "127.0.0.1:9110"\n'))
    assert (config.log_level, config.log_format, config.access_log, config.metrics_key) == ("DEBUG", "json", True, True)
    assert config.queue.metrics == "127.0.0.1:9110"
