"""``python -m utilgen.run``: the command line.

``--help`` and configuration errors answer without importing torch; torch and the extension
load only for the work that needs them. Exit status: 0 done, 1 a stage stopped (a non-finite
loss; resumable), 2 bad input (nothing written; also: another process holds the run directory),
130 interrupted by SIGINT, 143 stopped by SIGTERM (both resumable, with the same message).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

EXIT_STAGE_STOPPED, EXIT_BAD_INPUT = 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + the signal: what shells and batch schedulers expect

log = logging.getLogger("utilgen")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utilgen.run",
        description=(
            "UtilGen: utility-centric generative data augmentation. With no arguments: the whole method "
            "(class tokens, TODV, MLCO, ILPO, evaluation against real-only and plain generation) on the "
            "embedded Fashion-MNIST task, in minutes on a CPU."
        ),
        epilog="Exit status: 0 done; 1 a stage stopped (resume with --resume); 2 bad input; "
        "130 interrupted (SIGINT), 143 terminated (SIGTERM): resume with --resume.",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--preset",
        help="smoke | default | in-domain (the default with a generator that already knows the ten classes) | "
        "sd21 (Stable Diffusion 2.1; needs --generator and --data). "
        "Default: the config file's `preset`, else default",
    )
    run.add_argument("--config", metavar="FILE", help="YAML or TOML file of sections, e.g. [mlco] rounds = 2")
    run.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one key, e.g. --set mlco.rounds=2 --set evaluation.seeds=0,1,2 (repeatable)",
    )
    run.add_argument("--generator", metavar="PATH", help="a local Stable Diffusion directory (diffusers layout)")
    run.add_argument("--data", metavar="PATH", help="an ImageFolder: PATH/<class>/<image>")
    run.add_argument("--out", metavar="DIR", help="the run directory (new or empty). Default: runs/<preset>-<time>")
    run.add_argument("--seed", type=int, help="the run seed (run.seed)")
    run.add_argument("--device", help="auto | cpu | cuda | cuda:N (run.device)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last completed stage")
    run.add_argument(
        "--recover",
        action="store_true",
        help="with --resume: put back the backup of a damaged config.json or manifest.json first "
        "(the damaged file is kept as <name>.damaged; stages whose outputs still match are reused)",
    )
    run.add_argument("--list-keys", action="store_true", help="print every config key with its default and exit")
    output = parser.add_argument_group("output")
    output.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    output.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    info = parser.add_argument_group("environment")
    info.add_argument(
        "--info",
        action="store_true",
        help="print versions, whether utilgen._C loaded (and why not), CUDA/Triton availability, the "
        "backend each op would use and the generator's attention (xformers/SDPA), with reasons",
    )
    info.add_argument("--json", action="store_true", help="with --info: print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.info:
        return print_info(args.json)
    if args.list_keys:
        return list_keys()
    from utilgen.config import ConfigError

    with sigterm_as_interrupt():
        try:
            try:
                config, directory = resolve(args)
            except (ConfigError, ValueError, OSError) as error:
                return bad_input(error)
            configure_logging(args)
            return execute(config, directory, resuming=args.resume is not None, quiet=args.quiet)
        except KeyboardInterrupt as error:
            print(f"\nutilgen: {interruption(error)}", file=sys.stderr)
            return interrupted_status(error)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised wherever the run is. Batch schedulers and torchrun stop a job with SIGTERM; as a
    KeyboardInterrupt it unwinds exactly like Ctrl-C (atomic writes clean up, the resume hint prints)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises ``Terminated``; the previous handler is restored after it."""

    def terminate(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (main() called from a worker thread): leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interruption(error: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted"


def interrupted_status(error: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(error, Terminated) else EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------- config


def resolve(args: argparse.Namespace):
    """The config and run directory path, every input checked before anything is written."""
    from utilgen.config import ConfigError, build_config, config_from_dict, load_config_file
    from utilgen.rundir import RunDirectory

    if args.recover and not args.resume:
        raise ConfigError("--recover repairs an earlier run's records: use it with --resume DIR")
    if args.resume:
        if args.recover:
            recover_records(Path(args.resume))
        for option in ("preset", "config", "generator", "data", "seed", "out"):
            if getattr(args, option) is not None:
                raise ConfigError(
                    f"--resume continues a run with its saved config; --{option} cannot change it "
                    "(--set and --device may adjust stages not yet done)"
                )
        saved = RunDirectory.open(args.resume).read_config()
        config_from_dict(saved)  # the saved config itself is checked (errors name config.json)
        preset = saved.pop("preset", "default")
        overrides = list(args.overrides) + ([f"run.device={args.device}"] if args.device else [])
        return build_config(preset, saved, overrides), Path(args.resume)
    file_values = load_config_file(args.config) if args.config else None
    shortcuts = []
    if args.seed is not None:
        shortcuts.append(f"run.seed={args.seed}")
    if args.device:
        shortcuts.append(f"run.device={args.device}")
    # Absolute paths: a run resumed from another working directory still finds its inputs.
    if args.generator:
        shortcuts += ["generator.kind=stable-diffusion", f"generator.path={Path(args.generator).absolute()}"]
    if args.data:
        shortcuts.append(f"data.source={Path(args.data).absolute()}")
    preset = args.preset or (file_values or {}).get("preset") or "default"
    file_name = f"config file {args.config}" if args.config else "the config file"
    config = build_config(preset, file_values, shortcuts + list(args.overrides), file_name=file_name)
    if config.generator.kind == "stable-diffusion" and not config.generator.path:
        raise ConfigError("the Stable Diffusion generator needs its directory: --generator PATH")
    if config.preset == "sd21" and config.data.source in ("", "embedded", "validation"):
        raise ConfigError("the sd21 preset needs your data: --data PATH (an ImageFolder, PATH/<class>/<image>)")
    out = Path(args.out) if args.out else Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, out


def recover_records(directory: Path) -> None:
    """``--recover``: the damaged records of ``directory`` replaced by their backups, under the run's lock."""
    from utilgen.rundir import RunLock, recover

    if not directory.is_dir():
        raise FileNotFoundError(f"--resume {directory}: no such directory")
    lock = RunLock(directory)
    try:
        repaired = recover(directory)
    finally:
        lock.release()
    for line in repaired or [f"{directory}: config.json and manifest.json are intact; nothing to recover"]:
        print(f"utilgen: {line}", file=sys.stderr)


def list_keys() -> int:
    from utilgen.config import Config

    defaults = Config().to_dict()
    for section, values in defaults.items():
        if isinstance(values, dict):
            for key, value in values.items():
                print(f"{section}.{key} = {value!r}")
    return 0


def bad_input(error: BaseException) -> int:
    print(f"utilgen: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def configure_logging(args: argparse.Namespace) -> None:
    """The terminal gets --log-level (WARNING under --quiet); run.log always gets INFO and up (``execute``)."""
    console = logging.WARNING if args.quiet else getattr(logging, args.log_level)
    logging.basicConfig(level=console, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.setLevel(console)
    logging.getLogger().setLevel(min(console, logging.INFO))


# ---------------------------------------------------------------------------------- the run


def execute(config, directory: Path, *, resuming: bool, quiet: bool) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads cost 10-30x under contention
    from utilgen.config import ConfigError

    try:
        from utilgen import loop  # noqa: F401  (imported here so a broken install is bad input, not a traceback)
        from utilgen.preflight import preflight
        from utilgen.rundir import RunDirectoryError

        device, data = preflight(config, directory, resuming)
        run_dir = claim_run_directory(config, directory, resuming)
    except (ConfigError, ValueError, OSError, RuntimeError, ImportError, RunDirectoryError) as error:
        # ConfigError, ImageFolderError, the SD directory check, another process's lock: nothing written yet
        return bad_input(error)
    try:
        return run_stages(config, run_dir, data, device, resuming=resuming, quiet=quiet)
    finally:
        run_dir.release()  # the process may go on (main() called from Python): let the next run in


def claim_run_directory(config, directory: Path, resuming: bool):
    """The run directory, locked against a second process for as long as this run lasts (rank 0's job)."""
    from utilgen.rundir import RunDirectory

    if resuming:
        run_dir = RunDirectory.open(directory, lock=True)
    else:
        run_dir = RunDirectory.create(directory, config.to_dict(), lock=True)
    try:
        run_dir.write_config(config.to_dict())
    except BaseException:
        run_dir.release()
        raise
    return run_dir


class RunLog(logging.FileHandler):
    """``run.log``. When it cannot be written (a full disk) it says so once and goes quiet, instead of
    printing logging's traceback for every later line; the terminal keeps the messages and the run goes on."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.broken = True
        error = sys.exc_info()[1]
        print(f"utilgen: cannot write {self.baseFilename} ({error}); logging to the terminal only", file=sys.stderr)


def run_stages(config, run_dir, data, device, *, resuming: bool, quiet: bool) -> int:
    from utilgen import loop
    from utilgen.config import ConfigError
    from utilgen.preflight import describe_plan

    file_log = RunLog(run_dir.path / "run.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    if not quiet:
        print(f"utilgen: {'resuming' if resuming else 'run'} {run_dir.path} on {device}: {describe_plan(config)}")
        print(config.to_json())
    try:
        metrics = loop.run(config, run_dir, data, device=device, progress=not quiet)
    except loop.StageError as error:
        print(f"utilgen: stopped: {error}", file=sys.stderr)
        print(
            f"utilgen: the finished stages are kept; continue with: python -m utilgen.run --resume {run_dir.path}",
            file=sys.stderr,
        )
        return EXIT_STAGE_STOPPED
    except KeyboardInterrupt as error:
        print(
            f"\nutilgen: {interruption(error)}; continue with: python -m utilgen.run --resume {run_dir.path}",
            file=sys.stderr,
        )
        return interrupted_status(error)
    except (ConfigError, ValueError) as error:  # a check that only a stage could make; the finished stages are kept
        return bad_input(error)
    print_summary(metrics, run_dir.path)
    return 0


def print_summary(metrics: dict, path: Path) -> None:
    from utilgen.comparison import comparison_line
    from utilgen.report import accuracy_table_markdown

    print(accuracy_table_markdown(metrics["accuracy"]))
    for comparison in metrics["comparisons"]:
        print(comparison_line(comparison))
    print(f"report: {path / 'report.md'}")


def print_info(as_json: bool) -> int:
    from utilgen import ops  # imports torch
    from utilgen.generator.attention import attention_info

    generator_attention = attention_info()
    if as_json:
        import json

        print(json.dumps({**ops.info(), "generator": {"attention": generator_attention}}, indent=2, default=str))
    else:
        print(ops.info_text())
        print(
            f"generator attention [{generator_attention['device']}]: auto -> {generator_attention['auto']} "
            f"({generator_attention['reason']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
