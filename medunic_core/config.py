"""Typed configuration: one omegaconf structured schema, presets as YAML in ``configs/``.

Every Med-UniC constant (temperature, lambda, P_d width, the loss scalings) is a named
field here, never a literal in code, so the variants of the public code can be reproduced
with ``key=value`` overrides. Unknown keys and wrong types are errors, not silent defaults.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from medunic_core.constants import LANGUAGES
from medunic_core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRESET_DIR = CONFIG_DIR / "presets"


@dataclass
class ImageConfig:
    name: str = "vit_base_patch16_224"  # any timm model name; ViTs pool [CLS], CNNs average
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm kwargs (img_size, depth...)
    checkpoint: Optional[str] = None  # local timm state dict, loaded strictly
    size: int = 224  # side of the random crop fed to the encoder
    cache_size: int = 256  # side of the preprocessed image cached on disk (paper: 256)
    mean: float = 0.5
    std: float = 0.5


@dataclass
class TextConfig:
    pretrained: Optional[str] = None  # local HF folder (e.g. CXR-BERT); None builds from below
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 256
    dropout: float = 0.1  # stays on in training: CTR needs two dropout views of a report
    freeze_embeddings: bool = True
    freeze_layers: int = 9  # paper: embeddings + layers 0-8 of 12 frozen
    pooling: str = "cls"  # report embedding: "cls" (paper: the [CLS] state) or "mean" of the tokens' states


@dataclass
class HeadConfig:
    hidden_dim: int = 2048
    embed_dim: int = 512  # output of P_V and P_l
    ctr_dim: int = 1024  # D, output of P_d (the released script used 512)


@dataclass
class ModelConfig:
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class LossConfig:
    temperature: float = 0.07
    cvl_weight: float = 1.0
    ssv_weight: float = 1.0
    ctr: bool = True  # CTR on/off (off skips the second text pass)
    ctr_weight: float = 1.0
    ctr_lambda: float = 0.0051  # weight of the off-diagonal terms of L_TF and L_TT
    tf_denom: float = 2.0  # L_TF = raw / (tf_denom * D)
    tt_denom: float = 100.0  # L_TT = raw / (tt_denom * N); paper: 2N * 50
    use_tt: bool = True


@dataclass
class VocabConfig:
    base: Optional[str] = None  # local HF tokenizer folder to extend; None trains WordPiece
    vocab_size: int = 30522  # size of a WordPiece vocabulary trained from the corpus
    max_new_tokens: int = 5150  # whole-word tokens added to a base vocabulary
    min_df: int = 2  # a candidate token must occur in at least this many reports
    extend_lang: str = "es"  # community whose frequent tokens extend the base vocabulary
    lowercase: bool = True


@dataclass
class SiteConfig:
    name: str = "en-1"
    lang: str = "en"
    n: int = 200
    profile: str = "default"  # acquisition profile of the synthetic generator


@dataclass
class SynthConfig:
    out: str = "data/synthetic"
    seed: int = 0
    image_size: int = 256
    dicom_fraction: float = 0.25  # share of images written as DICOM instead of PNG
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    # Each community has a department scanner and a bedside (portable) unit, so that
    # acquisition differs by site but is not confounded with language.
    sites: list[SiteConfig] = field(
        default_factory=lambda: [
            SiteConfig(name="en-1", lang="en", n=400, profile="default"),
            SiteConfig(name="en-2", lang="en", n=200, profile="portable"),
            SiteConfig(name="es-1", lang="es", n=400, profile="highres"),
            SiteConfig(name="es-2", lang="es", n=200, profile="portable"),
        ]
    )


@dataclass
class DataConfig:
    manifest: str = "data/synthetic/manifest.jsonl"
    cache_dir: str = "cache/images"
    langs: list[str] = field(default_factory=lambda: ["en", "es"])
    num_workers: int = 0
    max_bad_fraction: float = 0.05  # unreadable images left out of training up to this share; more stops it


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    tokenizer: Optional[str] = None  # tokenizer folder; None builds one in out_dir/tokenizer
    epochs: int = 50
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    sites: list[str] = field(default_factory=list)  # train on these sites' rows only ([] = all; a one-site baseline)
    batch_size: int = 32
    accum_steps: int = 4
    lr: float = 4e-5
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    amp: bool = True  # only on CUDA (fp16 autocast with a grad scaler)
    seed: int = 42
    device: str = "auto"
    log_every: int = 10
    ckpt_every: int = 100  # optimizer steps between checkpoints
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists


@dataclass
class MlmConfig:
    """Stage 2 of MEDUNIC.md: masked-language post-training of the text encoder."""

    out_dir: str = "runs/mlm"
    steps: int = 1000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    mask_prob: float = 0.15  # of which 80% [MASK], 10% random token, 10% unchanged
    log_every: int = 50
    rounds: int = 3  # a federation's MLM stage: mlm.steps spread over this many rounds


@dataclass
class EvalConfig:
    split: str = "test"
    manifest: Optional[str] = None  # a fixed evaluation set (its eval.split rows) instead of data.manifest's
    batch_size: int = 64
    probe_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    probe_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    retrieval_k: list[int] = field(default_factory=lambda: [1, 5])
    tsne: bool = True


@dataclass
class AlignConfig:
    """The language-disentangled alignment state (DESIGN.md, "Federated alignment")."""

    train_norm: str = "local"  # local: the site's batch only; mixed: + other communities' moments
    eval_norm: str = "global"  # global: running statistics; community: the report's own language
    image: bool = False  # also mix P_V's BatchNorms
    round1: str = "stats"  # "stats": a statistics-only pass before round 1; "local": train round 1 locally


@dataclass
class FedConfig:
    """Federated run: rounds, local work and aggregation (DESIGN.md, "Aggregation")."""

    out_dir: str = "runs/federated"
    rounds: int = 3
    local_steps: int = 50  # optimizer steps per site and round
    site_optimizer: str = "keep"  # keep: a site's AdamW moments carry over the rounds of a run; reset: fresh each round
    # fedavg | fedavgm | fedprox | fedadam, or robust to a malicious minority of sites:
    # fedmedian (coordinate-wise median, >= 3 sites) | fedtrimmedavg (mean without the
    # fed.trim fraction of extreme values at each end, per coordinate)
    strategy: str = "fedavg"
    trim: float = 0.2  # fedtrimmedavg: the fraction cut off at each end, in [0, 0.5)
    proximal_mu: float = 0.01  # FedProx
    # The server's step on the sites' mean update: FedAdam's eta (default 0.01) or FedAvgM's
    # learning rate (default 1, FedAvg's step; the number of sites approximates taking their
    # local steps one after another). None: the strategy's default.
    server_lr: Optional[float] = None
    server_momentum: float = 0.9  # FedAvgM
    bn: str = "average"  # BatchNorm policy: "average" (FedAvg) or "local" (FedBN: never averaged)
    wire_dtype: str = "float32"  # float32 | float16 for the weights on the wire
    reject_factor: float = 10.0  # an update whose norm exceeds factor x median is rejected
    expected_sites: int = 0  # sites of the federation (0 = the run config's 'sites' list)
    min_sites: int = 0  # fewest sites a round may go on with after site_wait (0 = all expected)
    site_wait: float = 600.0  # seconds to wait for every expected site before a round starts
    round_timeout: float = 1800.0  # seconds the server waits for the replies of a round
    eval_every: int = 1  # rounds between evaluations
    resume: bool = True  # continue from out_dir/server_checkpoint.pt when it exists
    max_site_records: int = 1_000_000  # most records a site may report (evaluation, statistics, vocabulary)


@dataclass
class DpSgdConfig:
    """Sample-level DP-SGD (Opacus) where the loss is per sample: MLM and linear probing."""

    enabled: bool = False
    epsilon: Optional[float] = None  # target epsilon of one training; sets the noise
    noise_multiplier: Optional[float] = None  # or the noise directly (one of the two)
    delta: Optional[float] = None  # required: the delta of the (epsilon, delta) guarantee
    max_grad_norm: float = 1.0  # per-sample gradient clipping bound
    probe_epochs: int = 30  # epochs of a DP linear probe (Poisson batches of eval.batch_size)
    probe_lr: float = 0.5


@dataclass
class DpUpdateConfig:
    """Update-level DP for federated VLP: each site clips its update and adds Gaussian
    noise before it leaves the site (medunic_core.privacy)."""

    enabled: bool = False
    epsilon: Optional[float] = None  # target epsilon over fed.rounds releases; sets the noise
    noise_multiplier: Optional[float] = None  # or the noise directly: std = noise_multiplier x clip
    delta: Optional[float] = None  # required
    clip: float = 1.0  # L2 bound of a site's update (all travelling arrays together)


@dataclass
class DpConfig:
    sgd: DpSgdConfig = field(default_factory=DpSgdConfig)
    updates: DpUpdateConfig = field(default_factory=DpUpdateConfig)


@dataclass
class LoggingConfig:
    wandb: bool = True
    wandb_project: str = "medunic"
    wandb_mode: str = "offline"  # never asks for a login; "online" only when asked for


@dataclass
class MedUniCConfig:
    preset: str = "base"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# String fields that take one of a few values; checked whenever a config is loaded.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.text.pooling": ("cls", "mean"),
    "align.train_norm": ("local", "mixed"),
    "align.eval_norm": ("global", "community"),
    "align.round1": ("stats", "local"),
    "fed.strategy": ("fedavg", "fedavgm", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg"),
    "fed.site_optimizer": ("keep", "reset"),
    "fed.bn": ("average", "local"),
    "fed.wire_dtype": ("float32", "float16"),
}


# Numbers that must lie in a range; checked whenever a config is loaded, so that a wrong
# value fails at once with its key instead of as a NaN or a traceback mid-run.
POSITIVE = (
    "model.image.size", "model.image.cache_size", "model.image.std", "model.text.max_length",
    "model.head.hidden_dim", "model.head.embed_dim", "model.head.ctr_dim", "loss.temperature", "loss.tf_denom",
    "loss.tt_denom", "vocab.vocab_size", "vocab.min_df", "synth.image_size", "train.batch_size", "train.accum_steps",
    "train.lr", "train.grad_clip", "train.log_every", "train.ckpt_every", "train.epochs", "mlm.batch_size", "mlm.lr",
    "mlm.log_every", "mlm.rounds", "eval.batch_size", "fed.rounds", "fed.local_steps", "fed.reject_factor", "fed.site_wait",
    "fed.round_timeout", "fed.eval_every", "fed.max_site_records",
)
NON_NEGATIVE = (
    "loss.cvl_weight", "loss.ssv_weight", "loss.ctr_weight", "loss.ctr_lambda", "vocab.max_new_tokens",
    "data.num_workers", "train.weight_decay", "train.warmup_steps", "mlm.steps", "mlm.weight_decay",
    "mlm.warmup_steps", "fed.proximal_mu", "fed.expected_sites", "fed.min_sites",
    "model.text.freeze_layers",
)
OPTIONAL_POSITIVE = ("fed.server_lr",)  # None: a default chosen elsewhere
FRACTIONS = ("train.min_lr_ratio", "data.max_bad_fraction", "mlm.mask_prob", "model.text.dropout",
             "synth.dicom_fraction", "synth.test_fraction", "synth.val_fraction", "fed.server_momentum", "fed.trim")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"bad value for '{key}': '{value}' is not one of {', '.join(allowed)}")


def _check_ranges(cfg: DictConfig) -> None:
    """Sizes, rates and counts in range; known languages; a device torch can name."""
    for keys, ok, what, optional in ((POSITIVE, lambda v: v > 0, "> 0", False),
                                     (NON_NEGATIVE, lambda v: v >= 0, ">= 0", False),
                                     (FRACTIONS, lambda v: 0 <= v <= 1, "in [0, 1]", False),
                                     (OPTIONAL_POSITIVE, lambda v: v > 0, "> 0 (or null: the default)", True)):
        for key in keys:
            value = OmegaConf.select(cfg, key)
            if (value is None and not optional) or (value is not None and not ok(value)):
                raise ConfigError(f"bad value for '{key}': {value}; it must be {what}")
    langs = list(cfg.data.langs)
    unknown = [lang for lang in langs if lang not in LANGUAGES]
    if not langs or unknown or len(set(langs)) != len(langs):
        raise ConfigError(f"bad value for 'data.langs': {langs}; a non-empty list of distinct languages of "
                          f"{list(LANGUAGES)}")
    if cfg.vocab.extend_lang not in LANGUAGES:
        raise ConfigError(f"bad value for 'vocab.extend_lang': '{cfg.vocab.extend_lang}' is not one of {list(LANGUAGES)}")
    if not DEVICE.match(str(cfg.train.device)):
        raise ConfigError(f"bad value for 'train.device': '{cfg.train.device}' is not one of auto, cpu, cuda, "
                          "cuda:N, mps")


def _check_dp(cfg: DictConfig) -> None:
    """An enabled DP mechanism needs a delta in (0, 1) and exactly one of a positive target
    epsilon or a positive noise multiplier, and a positive clipping bound."""
    for name, bound in (("dp.sgd", "max_grad_norm"), ("dp.updates", "clip")):
        dp = OmegaConf.select(cfg, name)
        if not dp.enabled:
            continue
        if dp.delta is None:
            raise ConfigError(f"{name}.enabled needs {name}.delta, the delta of the (epsilon, delta) guarantee "
                              "(e.g. 1e-5, below 1 / number of records)")
        if not 0 < dp.delta < 1:
            raise ConfigError(f"bad value for '{name}.delta': {dp.delta} is not in (0, 1)")
        if (dp.epsilon is None) == (dp.noise_multiplier is None):
            raise ConfigError(f"{name}.enabled needs exactly one of {name}.epsilon (a target) or "
                              f"{name}.noise_multiplier; got epsilon={dp.epsilon}, noise_multiplier={dp.noise_multiplier}")
        if dp.epsilon is not None and dp.epsilon <= 0:
            raise ConfigError(f"bad value for '{name}.epsilon': {dp.epsilon}; epsilon must be > 0")
        if dp.noise_multiplier is not None and dp.noise_multiplier <= 0:
            raise ConfigError(f"bad value for '{name}.noise_multiplier': {dp.noise_multiplier}; it must be > 0")
        if dp[bound] <= 0:
            raise ConfigError(f"bad value for '{name}.{bound}': {dp[bound]}; it must be > 0")


def list_presets() -> list[str]:
    """Names of the YAML presets in ``configs/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full))
    return keys


def _config_error(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError):
        known = _all_keys(OmegaConf.structured(MedUniCConfig))
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    return ConfigError(f"{source}: bad value for '{key}': {str(exc).splitlines()[0]}")


def _load_yaml(path: Path) -> Any:
    """A YAML config file; one line naming the file when it cannot be read or parsed."""
    try:
        loaded = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{path} is not a readable YAML config ({type(exc).__name__}: {reason}); fix or "
                          "re-create it") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} is not a YAML mapping of config keys")
    return loaded


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, source) from exc


def load_config(
    preset: Optional[str] = "tiny",
    overrides: Optional[list[str]] = None,
    config_file: Optional[str | Path] = None,
) -> MedUniCConfig:
    """Schema defaults, then a preset (or a saved config file), then ``key=value`` overrides.

    Returns a typed, read-only DictConfig that behaves like :class:`MedUniCConfig`.
    """
    cfg = OmegaConf.structured(MedUniCConfig)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        cfg = _merge(cfg, _load_yaml(path), str(path))
    elif preset is not None:
        path = PRESET_DIR / f"{preset}.yaml"
        if preset not in list_presets():  # a name, never a path: a run config names it over the network
            close = difflib.get_close_matches(preset, list_presets(), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"unknown preset '{preset}'; {hint}available: {', '.join(list_presets())}"
            )
        cfg = _merge(cfg, _load_yaml(path), str(path))
        cfg.preset = preset
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_dp(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg  # type: ignore[return-value]


def save_config(cfg: MedUniCConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML, so a run can be re-created exactly."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def to_dict(cfg: MedUniCConfig) -> dict[str, Any]:
    """Plain nested dict (for JSON, wandb and Flower run configs)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """A nested mapping as one level: ``{"fed": {"rounds": 3}}`` -> ``{"fed.rounds": 3}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, sep, f"{prefix}{k}{sep}") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


# What a resumed run may set differently from the run that wrote its checkpoint: where it
# writes, logs and caches, how long it waits, what it evaluates. Anything else (data, model,
# schedule, rounds, steps, seeds, privacy) would continue one run under another's settings.
RESUME_MAY_CHANGE = ("train.resume", "train.out_dir", "train.log_every", "train.ckpt_every", "train.device",
                     "fed.resume", "fed.out_dir", "fed.round_timeout", "fed.site_wait", "fed.min_sites",
                     "fed.eval_every", "fed.max_site_records", "data.cache_dir", "data.num_workers", "eval.",
                     "logging.")


def check_resumable(saved: Mapping[str, Any], cfg: MedUniCConfig, checkpoint: str | Path, flag: str) -> None:
    """Refuse to continue, from ``checkpoint`` (written with the config ``saved``), a run of
    other settings (a key only one side has, of another schema version, is not compared)."""

    before, now = flatten(saved), flatten(to_dict(cfg))
    changed = sorted(k for k in before.keys() & now.keys()
                     if before[k] != now[k] and not any(k == m or (m.endswith(".") and k.startswith(m))
                                                        for m in RESUME_MAY_CHANGE))
    if changed:
        shown = "; ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed[:6])
        raise ConfigError(f"{checkpoint} was written by a run of other settings ({shown}"
                          f"{f'; {len(changed) - 6} more' if len(changed) > 6 else ''}): give this run its own "
                          f"out_dir, or {flag}=false to start it over there")
