"""``medunic simulate``: a federated Med-UniC run in Flower's Simulation Engine.

It prepares what a real federation would have before its first round (synthetic sites of
each language community, the shared tokenizer and, with ``mlm.steps > 0``, an
MLM-initialised text encoder), then runs ``flwr run <app> <connection> --stream`` against
a simulation SuperLink that it starts itself on free loopback ports with a project-local
``FLWR_HOME``, streams the progress, stops that SuperLink (and everything it spawned)
whatever happens, and points to the report the coordinator wrote in the run folder.

The tokenizer and the MLM warm-up of this command are computed centrally on the synthetic
training reports; ``medunic pipeline`` (simulation.pipeline) runs them as federated stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

from medunic_core.cli import add_config_args, subprocess_env
from medunic_core.config import MedUniCConfig, load_config
from medunic_core.constants import LANGUAGES
from medunic_core.data.manifest import read_manifest
from medunic_core.errors import ConfigError, MedunicError
from medunic_core.vocab import build_tokenizer
from server.coordinator import write_connection
from simulation.centralized import ensure_synthetic_data, text_warmup

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: the repository's pyproject
CONNECTION = "medunic-sim"
RUN_TAG = "MEDUNIC_SIMULATION_TAG"  # environment marker of the processes one simulation starts
PROFILES = {"en": ("default", "portable", "lowdose"), "es": ("highres", "portable", "lowdose")}


def parse_site_counts(spec: str) -> list[tuple[str, int]]:
    """``"en:2,es:1"`` -> [("en", 2), ("es", 1)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        lang, sep, count = item.partition(":")
        if lang not in LANGUAGES or (sep and not count.isdigit()):
            raise ConfigError(f"--sites: '{item}' is not 'lang:count' with lang in {LANGUAGES}")
        out.append((lang, int(count) if sep else 1))
    if not out or sum(n for _, n in out) < 1:
        raise ConfigError(f"--sites '{spec}' names no site")
    return out


def site_overrides(spec: str, pairs_per_site: int) -> tuple[list[str], str]:
    """Overrides that make the synthetic generator write one folder per site, and the
    run-config ``sites`` list that maps Flower partitions to those sites."""
    sites, names = [], []
    for lang, count in parse_site_counts(spec):
        for i in range(count):
            name = f"{lang}-{i + 1}"
            profile = PROFILES[lang][i % len(PROFILES[lang])]
            sites.append(f"{{name: {name}, lang: {lang}, n: {pairs_per_site}, profile: {profile}}}")
            names.append(f"{name}:{lang}")
    tag = "-".join(f"{lang}{count}" for lang, count in parse_site_counts(spec))
    return [f"synth.sites=[{', '.join(sites)}]", f"synth.out=data/federated-{tag}-{pairs_per_site}",
            f"data.manifest=data/federated-{tag}-{pairs_per_site}/manifest.jsonl"], ",".join(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path, tag: str) -> dict[str, str]:
    """The environment of every Flower process we start: offline, quiet, project-local
    home, and a tag that finds them (and what they spawn, Ray included) to stop them."""
    env = subprocess_env(FLWR_HOME=str(flwr_home), **{RUN_TAG: tag})
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per simulated site
    return env


def tagged_processes(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``RUN_TAG=tag``."""
    marker = f"{RUN_TAG}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def stop_tagged(tag: str, grace: float = 10.0) -> None:
    """SIGTERM every tagged process, SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tagged_processes(tag):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not tagged_processes(tag):
            return


@contextmanager
def simulation_superlink(flwr_home: Path, log_file: Path, tag: str) -> Iterator[str]:
    """Start a simulation SuperLink on a free loopback port; always stop it and all it
    spawned (simulation runtime, ServerApp, Ray) when the block ends."""
    port = _free_port()  # Flower 1.42 serves the runtime, control and fleet APIs on one HTTP port
    write_connection(f"127.0.0.1:{port}", None, insecure=True, home=flwr_home, name=CONNECTION)
    command = [
        str(Path(sys.executable).with_name("flower-superlink")), "--insecure", "--simulation",
        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(command, env=flower_env(flwr_home, tag), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise MedunicError(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.3)
        else:
            raise MedunicError(f"flower-superlink did not open 127.0.0.1:{port} within 60 s; see {log_file}")
        yield CONNECTION
    finally:
        stop_tagged(tag)
        proc.wait()


def prepare(cfg_overrides: list[str], preset: str, progress: bool) -> tuple[MedUniCConfig, list[str], str]:
    """Data, tokenizer and text warm-up; returns the config, the final overrides (absolute
    paths, because Flower's processes do not run in this directory) and the tokenizer."""
    cfg = load_config(preset, cfg_overrides)
    ensure_synthetic_data(cfg, progress)
    absolute = [
        f"data.manifest={Path(cfg.data.manifest).resolve()}",
        f"data.cache_dir={Path(cfg.data.cache_dir).resolve()}",
        f"fed.out_dir={Path(cfg.fed.out_dir).resolve()}",
        f"mlm.out_dir={Path(cfg.fed.out_dir).resolve() / 'mlm'}",
    ]
    overrides = [*cfg_overrides, *absolute]
    cfg = load_config(preset, overrides)
    warm = text_warmup(cfg, progress)
    overrides += [f"model.text.pretrained={Path(v.split('=', 1)[1]).resolve()}" for v in warm if v.startswith("model.text.pretrained=")]
    tokenizer = next((v.split("=", 1)[1] for v in warm if v.startswith("train.tokenizer=")), cfg.train.tokenizer)
    if not tokenizer:
        folder = Path(cfg.fed.out_dir) / "tokenizer"
        records = read_manifest(cfg.data.manifest, cfg.data.langs, split="train")
        build_tokenizer(cfg.vocab, [(r.report, r.lang) for r in records], folder, cfg.model.text.max_length)
        tokenizer = str(folder)
    return load_config(preset, overrides), overrides, str(Path(tokenizer).resolve())


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def write_run_config(path: Path, stage: str, preset: str, overrides: Sequence[str], sites: str, tokenizer: str) -> Path:
    """The Flower run config file of one stage (``flwr run --run-config``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"stage = {_toml_string(stage)}\npreset = {_toml_string(preset)}\n"
        f"overrides = {_toml_string(json.dumps(list(overrides)))}\n"
        f"sites = {_toml_string(sites)}\ntokenizer = {_toml_string(tokenizer)}\n"
    )
    return path


def flwr_run(connection: str, run_config: Path, sites: str, flower_log: Path, env: dict[str, str],
             progress: bool) -> int:
    """``flwr run`` of this app against a simulation SuperLink, one simulated SuperNode per
    site; streams its progress (all of it, or the round lines) and returns its exit code."""
    n_sites = len(sites.split(","))
    federation = (
        f"num-supernodes={n_sites} client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
        f"init-args-num-cpus={max(2, min(n_sites, os.cpu_count() or 2))}"
    )
    command = [str(Path(sys.executable).with_name("flwr")), "run", str(APP_DIR), connection, "--stream",
               "--run-config", str(run_config), "--federation-config", federation]
    with flower_log.open("w") as logf:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=APP_DIR)
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            if progress or "ROUND" in line or "round" in line or "ERROR" in line or "stage" in line:
                print(line, end="", flush=True)
        return proc.wait()


def simulate(
    preset: str,
    overrides: Sequence[str],
    sites: str = "en:1,es:1",
    pairs_per_site: int = 400,
    progress: bool = True,
    flwr_home: Optional[Path] = None,
) -> Path:
    """Run one federated simulation; returns the run folder (``fed.out_dir``)."""
    synth, site_list = site_overrides(sites, pairs_per_site)
    cfg, final, tokenizer = prepare([*synth, *overrides], preset, progress)
    run_dir = Path(cfg.fed.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_config = write_run_config(run_dir / "run_config.toml", "vlp", preset, final, site_list, tokenizer)
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or APP_DIR / ".flwr").resolve()
    print(f"federated run: {len(site_list.split(','))} sites ({site_list}), {cfg.fed.rounds} rounds x "
          f"{cfg.fed.local_steps} local steps -> {run_dir}", flush=True)
    tag = uuid.uuid4().hex
    with simulation_superlink(flwr_home, run_dir / "superlink.log", tag) as connection:
        rc = flwr_run(connection, run_config, site_list, run_dir / "flower.log", flower_env(flwr_home, tag), progress)
    flower_log = run_dir / "flower.log"
    export = run_dir / "model" / "checkpoint.pt"
    if rc != 0 or not export.is_file():
        tail = flower_log.read_text().splitlines()[-30:]
        raise MedunicError(f"the federated run did not finish (flwr exit {rc}); last lines of "
                           f"{flower_log}:\n" + "\n".join(tail))
    report = run_dir / "report" / "report.md"  # written by the coordinator (server.rounds)
    print(f"\nreport: {report}")
    return run_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("simulate", help="federated Med-UniC in Flower's Simulation Engine (EN+ES sites)")
    add_config_args(parser, preset="tiny")
    parser.add_argument("--sites", default="en:1,es:1", help="sites per language, e.g. en:2,es:1 (default: %(default)s)")
    parser.add_argument("--pairs-per-site", type=int, default=400, help="synthetic pairs per site (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="shortcut for fed.rounds=N")
    parser.add_argument("--ctr", choices=("on", "off"), default=None, help="shortcut for loss.ctr")
    parser.add_argument("--train-norm", choices=("local", "mixed"), default=None, help="shortcut for align.train_norm")
    parser.add_argument("--eval-norm", choices=("global", "community"), default=None, help="shortcut for align.eval_norm")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.rounds is not None:
        overrides.append(f"fed.rounds={args.rounds}")
    if args.ctr is not None:
        overrides.append(f"loss.ctr={'true' if args.ctr == 'on' else 'false'}")
    if args.train_norm:
        overrides.append(f"align.train_norm={args.train_norm}")
    if args.eval_norm:
        overrides.append(f"align.eval_norm={args.eval_norm}")
    simulate(args.preset, overrides, args.sites, args.pairs_per_site, not args.no_progress)
    return 0
