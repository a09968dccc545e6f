"""The ``facegrid`` command: build models, run services, run the whole system."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from facegrid import auth, serving
from facegrid.config import add_overrides_argument, load_settings
from facegrid.models.repository import TritonBackend

# Sub-commands that live outside the runtime kernel, loaded only when named, so that
# `facegrid serve NAME` imports neither the client nor the evaluation tools: the first
# word of the command line -> the module whose ``register(commands)`` adds it.
LAZY_COMMANDS = {
    "collections": "facegrid_client.commands",
    "index": "facegrid_client.commands",
    "seed": "facegrid_client.commands",
    "detect": "facegrid_client.commands",
    "search": "facegrid_client.commands",
    "search-face": "facegrid_client.commands",
    "compare": "facegrid_client.commands",
    "faces": "facegrid_client.commands",
    "subjects": "facegrid_client.commands",
    "audit": "facegrid_client.commands",
    "watch": "facegrid_client.watch",
    "processors": "facegrid_client.watch",
    "config": "facegrid.config_reference",
    "eval": "facegrid_eval.commands",
    "calibrate": "facegrid_eval.commands",
    "eval-detection": "facegrid_eval.commands",
}
# Each tool's package -> the extra that installs what it needs (pyproject.toml).
TOOL_EXTRAS = {
    "facegrid_client": "client",
    "facegrid_eval": "eval",
    "facegrid_models": "models",
    "facegrid_harness": "harness",
}


def import_tool(module: str) -> ModuleType:
    """Import a tool's module, or exit naming the extra that would install what it lacks."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        extra = TOOL_EXTRAS.get(module.split(".")[0])
        if extra is None:
            raise
        raise SystemExit(
            f"facegrid: this command needs {error.name}, which the {extra} extra installs:"
            f" pip install 'facegrid[{extra}]'"
        ) from error


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = _parser(next((word for word in words if not word.startswith("-")), ""))
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facegrid", description=__doc__)
    commands = parser.add_subparsers(title="commands")

    models = commands.add_parser("models", help="build the ONNX models and Triton repository")
    model_commands = models.add_subparsers(title="models commands")
    build = model_commands.add_parser(
        "build", help="convert the installed dlib networks to ONNX in a Triton repository"
    )
    build.add_argument("--repo", type=Path, required=True, help="model repository to write")
    build.add_argument(
        "--backend",
        choices=[b.value for b in TritonBackend],
        default=TritonBackend.ONNXRUNTIME.value,
        help="Triton backend to configure (python: for servers without onnxruntime)",
    )
    build.set_defaults(handler=_models_build)

    serve = commands.add_parser("serve", help="run one service in the foreground")
    serve.add_argument("service", choices=sorted(serving.SERVICES))
    add_overrides_argument(serve)
    serve.add_argument("--port", type=int, help="port to listen on (0: any free port)")
    serve.set_defaults(handler=_serve)

    up = commands.add_parser(
        "up", help="start every service on this machine, wait until healthy, stop on Ctrl-C"
    )
    add_overrides_argument(up)
    up.add_argument(
        "--seed",
        type=Path,
        action="append",
        default=[],
        metavar="MANIFEST",
        help="once healthy, enrol the photos of a seeds manifest (repeatable; idempotent)",
    )
    up.add_argument(
        "--no-demo",
        dest="demo",
        action="store_false",
        help="do not seed the demo collection (seeds/demo.toml, shipped in the package)",
    )
    up.set_defaults(handler=_up)

    token = commands.add_parser("token", help="manage the gateway's callers")
    token_commands = token.add_subparsers(title="token commands")
    create = token_commands.add_parser(
        "create", help="add a caller with the given scopes and print its bearer token once"
    )
    create.add_argument("principal", help="the caller's name, as audit records will show it")
    create.add_argument(
        "--scope",
        dest="scopes",
        action="append",
        choices=auth.ALL_SCOPES,
        required=True,
        help="a scope to grant (repeatable)",
    )
    create.add_argument(
        "--purpose",
        dest="purposes",
        action="append",
        default=[],
        choices=auth.PURPOSES,
        help="a purpose it may identify for (repeatable; none given: any)",
    )
    create.add_argument(
        "--credentials-file",
        type=Path,
        help="default: the gateway's setting gateway.credentials_file",
    )
    create.set_defaults(handler=_token_create)

    triton = commands.add_parser(
        "triton", help="run the tritonserver binary bundled in nvidia-pytriton (for tests, demos)"
    )
    triton.add_argument(
        "--repo", type=Path, required=True, help="model repository (python backend)"
    )
    triton.add_argument("--venv", type=Path, default=Path(".venv-triton"))
    triton.set_defaults(handler=_triton)

    module = LAZY_COMMANDS.get(command)
    if module is not None:
        import_tool(module).register(commands)
    else:  # listed in --help; any one of them named loads its module instead
        for name in LAZY_COMMANDS:
            commands.add_parser(name, help=f"(see facegrid {name} --help)")
    return parser


def _models_build(args: argparse.Namespace) -> int:
    build = import_tool("facegrid_models.build")
    built = build.build_repository(args.repo, TritonBackend(args.backend))
    for model in built:
        print(f"{model.name:15} {model.model_version:18} sha256:{model.sha256[:16]}  {model.path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.port is not None:
        overrides.append(f"{args.service}.port={args.port}")
    return serving.serve_one(args.service, overrides)


def _up(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    settings = load_settings(overrides)
    token = auth.ensure_local_admin(settings.gateway.credentials_file)
    seeding = import_tool("facegrid_client.seeding")
    launcher = import_tool("facegrid_harness.launcher")

    manifests: list[Path] = ([seeding.DEMO_MANIFEST] if args.demo else []) + list(args.seed)

    def seed(addresses: dict[str, str]) -> None:
        for manifest in manifests:
            try:
                summary = seeding.seed_manifest(manifest, addresses["gateway"], token)
            except Exception as error:  # a bad manifest must not take the system down
                print(f"  seeding {manifest} failed: {error}", flush=True)
                continue
            print(f"  seeded {manifest.name}: {summary}", flush=True)
        print(
            f"  local admin token in {auth.DEFAULT_TOKEN_FILE} "
            "(the facegrid client reads it from there)",
            flush=True,
        )

    return int(launcher.up(overrides, after_start=seed))


def _token_create(args: argparse.Namespace) -> int:
    path = args.credentials_file or load_settings().gateway.credentials_file
    token = auth.create_token(path, args.principal, args.scopes, args.purposes)
    print(f"created {args.principal} in {path} with {', '.join(sorted(set(args.scopes)))}")
    print(f"token (shown once; the file keeps only its SHA-256): {token}")
    print("the gateway reads the file at start-up: restart it to admit the new caller")
    return 0


def _triton(args: argparse.Namespace) -> int:
    launcher = import_tool("facegrid_harness.launcher")
    return int(launcher.run_triton(args.repo, args.venv))


if __name__ == "__main__":
    sys.exit(main())
