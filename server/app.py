"""The Med-UniC ServerApp: Flower's entry point on the coordinator (``server.app:app``).

The run config's ``stage`` picks what the run does (medunic_core.federation.runconfig):
``vocab``, ``mlm`` or ``vlp`` runs that stage (server.stages); ``all`` (the default, what
``flwr run .`` does) runs the whole method as one run, each stage only when its output is
missing (``text`` stops after the MLM stage): in a simulation the synthetic sites' data (generated), then the vocabulary stage
(``<out>/vocab/tokenizer``), the MLM stage when ``mlm.steps > 0`` (``<out>/mlm/text_encoder``)
and the VLP stage (``<out>/model``, ``<out>/report/report.md``). A run that cannot start
says why in one line, without a traceback.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from medunic_core.config import load_config
from medunic_core.data.synthetic.generator import generate
from medunic_core.errors import ConfigError, MedunicError
from medunic_core.federation.runconfig import (
    PAIRS_PER_SITE, parse_site_specs, run_stage, synth_sites_override, synthetic_data_dir)
from server.stages import STAGES, TEXT_ENCODER_DIR, TOKENIZER_DIR, Federation, MlmStage, VlpStage, VocabStage

log = logging.getLogger("flwr.medunic")

app = ServerApp()



class RunStopped(Exception):
    """A run that cannot go on. Its one-line reason is logged first; Flower marks the run
    failed with it (``flwr ls``), and the traceback it prints is this one frame."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, context.run_config)
    except MedunicError as exc:
        log.error("medunic: %s", exc)
        raise RunStopped(f"medunic: {exc}") from None


def run(grid: Grid, run_config) -> Path:
    """The run the run config asks for; returns what its last stage exported."""
    stage = run_stage(run_config)
    federation = Federation.from_run_config(run_config)
    if stage not in ("all", "text"):
        return STAGES[stage](federation).run(grid)
    if not federation.simulation:
        raise ConfigError(f"stage={stage} runs in a simulation (run config sites=...); a deployment runs its stages one "
                          "by one (`medunic server run --stage vocab|mlm|vlp`), the sites installing each result")
    federation = simulation_data(federation)
    out = Path(federation.cfg.fed.out_dir)
    cfg = federation.cfg
    if not cfg.train.tokenizer:
        tokenizer = out / "vocab" / TOKENIZER_DIR
        if not (tokenizer / "vocab.sha256").is_file():
            VocabStage(federation.staging(f"fed.out_dir={out / 'vocab'}")).run(grid)
        federation = federation.staging(f"train.tokenizer={tokenizer}")
    if cfg.mlm.steps > 0 and not cfg.model.text.pretrained:
        encoder = out / "mlm" / TEXT_ENCODER_DIR
        if not (encoder / "config.json").is_file():
            steps = math.ceil(cfg.mlm.steps / cfg.mlm.rounds)
            MlmStage(federation.staging(f"fed.out_dir={out / 'mlm'}", f"fed.rounds={cfg.mlm.rounds}",
                                        f"fed.local_steps={steps}")).run(grid)
        federation = federation.staging(f"model.text.pretrained={encoder}")
    if stage == "text":
        log.info("text stages done: tokenizer %s, text encoder %s", federation.cfg.train.tokenizer,
                 federation.cfg.model.text.pretrained)
        return Path(federation.cfg.train.tokenizer)
    exported = VlpStage(federation).run(grid)
    log.info("report: %s", (out / "report" / "report.md").resolve())
    return exported


def simulation_data(federation: Federation) -> Federation:
    """A simulation's shared manifest, generated (synthetic sites, as the run config lists
    them) when missing; its paths made absolute and staged, so the simulated sites use them."""
    cfg, run_config = federation.cfg, federation.run_config
    staged = []
    if any(o.startswith("data.manifest=") for o in federation.overrides):  # given (run config data, overrides)
        if not Path(cfg.data.manifest).is_file():
            raise ConfigError(f"the sites' manifest {Path(cfg.data.manifest).resolve()} does not exist (run config "
                              "data); leave data empty to generate synthetic sites")
        staged.append(f"data.manifest={Path(cfg.data.manifest).resolve()}")
    else:
        sites = parse_site_specs(str(run_config["sites"]), int(run_config.get("pairs", 0) or PAIRS_PER_SITE))
        folder = synthetic_data_dir(sites)
        if not (folder / "manifest.jsonl").is_file():
            synth = load_config(federation.preset, [*federation.overrides, synth_sites_override(sites)]).synth
            log.info("generating the synthetic sites %s in %s", run_config["sites"], folder.resolve())
            generate(synth, folder, progress=False)
        staged.append(f"data.manifest={(folder / 'manifest.jsonl').resolve()}")
    staged += [f"{key}={Path(value).resolve()}" for key, value in (
        ("data.cache_dir", cfg.data.cache_dir), ("fed.out_dir", cfg.fed.out_dir), ("mlm.out_dir", cfg.mlm.out_dir))]
    federation = federation.staging(*staged)
    log.info("simulation: data %s, run folder %s", federation.cfg.data.manifest, federation.cfg.fed.out_dir)
    return federation
