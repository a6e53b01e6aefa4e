from pathlib import Path

import pytest

from worker.config import Settings, SettingsError


def test_defaults_are_valid_and_loopback():
    settings = Settings.from_env({})

    assert settings.broker == "kafka://127.0.0.1:9092"
    assert settings.web_host == "127.0.0.1"
    assert settings.emit == "every_event"


def test_env_values_are_parsed_by_type():
    env = {
        "STREAMREC_PARTITIONS": "12",
        "STREAMREC_BATCH_MAX_MS": "2.5",
        "STREAMREC_CREATE_TOPICS": "false",
        "STREAMREC_BUNDLE_DIR": "/models/v3",
        "STREAMREC_EMIT": "coalesce",
    }

    settings = Settings.from_env(env)

    assert settings.partitions == 12
    assert settings.batch_max_ms == 2.5
    assert settings.create_topics is False
    assert settings.bundle_dir == Path("/models/v3")
    assert settings.emit == "coalesce"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("STREAMREC_PARTITIONS", "many", "expected an integer"),
        ("STREAMREC_PARTITIONS", "0", "must be at least 1"),
        ("STREAMREC_EMIT", "sometimes", "expected one of every_event, coalesce"),
        ("STREAMREC_CREATE_TOPICS", "maybe", "expected true or false"),
        ("STREAMREC_WEB_PORT", "70000", "expected a TCP port"),
        ("STREAMREC_MODEL_POLL_S", "nan", "expected a finite number"),
        ("STREAMREC_BATCH_MAX_MS", "inf", "expected a finite number"),
        ("STREAMREC_PRODUCER_LINGER_MS", "-1", "must be >= 0"),
        ("STREAMREC_SHUTDOWN_TIMEOUT_S", "0", "must be > 0"),
        ("STREAMREC_BROKER", "127.0.0.1:9092", "expected kafka://HOST:PORT"),
        ("STREAMREC_BROKER", "kafka://127.0.0.1", "expected kafka://HOST:PORT"),
        ("STREAMREC_BROKER", "kafka://127.0.0.1:1,", "expected kafka://HOST:PORT"),
    ],
)
def test_invalid_env_value_names_variable_and_value(name, value, expected):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({name: value})

    assert name in str(error.value)
    assert value in str(error.value)
    assert expected in str(error.value)


def test_bootstrap_servers_strips_faust_scheme():
    settings = Settings.from_env({"STREAMREC_BROKER": "kafka://127.0.0.1:1,kafka://127.0.0.1:2"})

    assert settings.bootstrap_servers == "127.0.0.1:1,127.0.0.1:2"


def test_every_field_has_env_name_and_help():
    names = Settings.env_names()
    described = Settings.describe()

    assert len(names) == len(set(names))
    for name in names:
        assert name.startswith("STREAMREC_")
        assert name in described


def test_faust_env_variables_ignored(monkeypatch, tmp_path):
    from worker.app import build_faust_app

    # faust reads these; Kubernetes service links define variables of the same form.
    monkeypatch.setenv("WEB_PORT", "tcp://10.0.0.1:80")
    monkeypatch.setenv("BROKER_URL", "kafka://10.0.0.1:9092")
    monkeypatch.setenv("PRODUCER_LINGER", "9")
    settings = Settings.from_env({"STREAMREC_WEB_PORT": "7001", "STREAMREC_STATE_DIR": str(tmp_path)})

    conf = build_faust_app(settings).conf

    assert conf.web_port == 7001
    assert [str(url) for url in conf.broker] == ["kafka://127.0.0.1:9092"]
    assert conf.producer_linger == settings.producer_linger_ms / 1000
