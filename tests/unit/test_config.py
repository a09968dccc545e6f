"""Settings: environment variables, --set overrides, and the deployment's ConfigMap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from facegrid.config import InferenceBackendKind, Settings, load_settings, parse_overrides

K8S_CONFIG = Path(__file__).resolve().parents[2] / "k8s" / "base" / "config.yaml"


def test_defaults_are_the_embedded_one_machine_setup() -> None:
    settings = Settings()
    assert settings.inference.backend is InferenceBackendKind.LOCAL
    assert settings.store.uri.endswith(".db")  # Milvus Lite
    assert settings.server.host == "127.0.0.1"


def test_environment_then_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEGRID_INFERENCE__BACKEND", "triton")
    monkeypatch.setenv("FACEGRID_EMBEDDING__MAX_BATCH", "8")
    settings = load_settings(["embedding.max_batch=16", "store.uri=http://milvus:19530"])
    assert settings.inference.backend is InferenceBackendKind.TRITON
    assert settings.embedding.max_batch == 16
    assert settings.store.uri == "http://milvus:19530"


@pytest.mark.parametrize("bad", ["no-equals-sign", "=value"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ValueError, match=r"section\.field=value"):
        parse_overrides([bad])


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="no_such_field"):
        load_settings(["store.no_such_field=1"])


def test_kubernetes_config_names_only_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(K8S_CONFIG.read_text())["data"]
    pairs = [(name, value) for name, value in data.items() if name.startswith("FACEGRID_")]
    assert len(pairs) > 20
    for name, value in pairs:
        monkeypatch.setenv(name, value)
    settings = Settings()  # extra="forbid": an unknown variable would fail here
    for name, value in pairs:
        section, field = name.removeprefix("FACEGRID_").lower().split("__")
        actual = getattr(getattr(settings, section), field)
        expected = json.loads(value) if isinstance(actual, list) else type(actual)(value)
        assert actual == expected, name
