"""Radiology reports in English and Spanish written from a finding specification.

Two things vary, and they are kept apart as data: the *words* of a language
(:class:`Vocabulary`: synonyms, negations, hedges, severity and side adjectives with their
grammatical agreement, normal-anatomy statements) and the *habits* of a reporting community
(:class:`ReportStyle`: sectioned full sentences versus telegraphic lowercase phrases, how
often normal findings are negated, how long a report is). By default the English community
writes MIMIC-like ``FINDINGS: ... IMPRESSION: ...`` reports and the Spanish one writes
PadChest-like telegraphic phrases, so the two communities differ in more than vocabulary,
which is the bias Med-UniC has to remove.

Label rule: every positive finding is mentioned; a hedged mention ("possible ...",
"no se descarta ...") only happens for a mild finding flagged ``uncertain`` and still counts
as positive (label 1). Absent findings are either not mentioned or explicitly negated, and
normal-anatomy statements are only used when no positive finding contradicts them.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from medunic_core.constants import FINDINGS
from medunic_core.data.synthetic.renderer import Finding
from medunic_core.errors import ConfigError


@dataclass(frozen=True)
class Phrases:
    """Templates for one finding in one register; ``{sev} {side} {loc} {size}`` are filled in."""

    positive: tuple[str, ...]
    uncertain: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class FindingWords:
    """How one language talks about one finding, in full sentences and in short phrases."""

    full: Phrases
    short: Phrases
    severity: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    side: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # agrees with the noun
    followup: tuple[str, ...] = ()  # recommendation a radiologist adds for this finding


@dataclass(frozen=True)
class Statement:
    """A normal-anatomy statement; it may only be used when none of ``rules_out`` is present."""

    full: str
    short: str
    rules_out: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Vocabulary:
    """All the words of one language needed to write a report."""

    lang: str
    headers: tuple[str, str]  # findings section, impression section
    findings: Mapping[str, FindingWords]
    locations: Mapping[tuple[str, str], tuple[str, ...]]  # (zone, laterality) -> phrases
    normal: tuple[Statement, ...]
    all_clear: Phrases  # summary of a normal study: only ``positive`` is used
    technique: tuple[str, ...]  # full-register opening lines
    technique_short: tuple[str, ...]
    closing: tuple[str, ...]  # habitual last lines that carry no finding
    nodule_mm: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: {"mild": (6, 12), "moderate": (13, 20), "severe": (21, 30)}
    )


@dataclass(frozen=True)
class ReportStyle:
    """The reporting habits of a community, independent of its language."""

    name: str
    register: str  # "full" sentences or "short" telegraphic phrases
    sections: bool  # FINDINGS: ... IMPRESSION: ...
    lowercase: bool
    p_technique: float  # chance of an opening technique line
    p_negative: float  # chance that each absent finding is explicitly negated
    normal_statements: tuple[int, int]  # how many normal-anatomy statements, inclusive range
    p_followup: float  # chance of a recommendation after a finding that has one
    p_closing: float  # chance of a habitual closing line
    p_all_clear: float  # chance that a normal study is summarised in one phrase


STYLES: dict[str, ReportStyle] = {
    s.name: s
    for s in (
        # MIMIC-CXR-like: sectioned, full sentences, many pertinent negatives.
        ReportStyle(
            name="structured",
            register="full",
            sections=True,
            lowercase=False,
            p_technique=0.6,
            p_negative=0.45,
            normal_statements=(1, 3),
            p_followup=0.6,
            p_closing=0.15,
            p_all_clear=1.0,
        ),
        # PadChest-like: lowercase telegraphic phrases, few negatives, short.
        ReportStyle(
            name="telegraphic",
            register="short",
            sections=False,
            lowercase=True,
            p_technique=0.25,
            p_negative=0.25,
            normal_statements=(0, 2),
            p_followup=0.3,
            p_closing=0.1,
            p_all_clear=0.7,
        ),
    )
}
DEFAULT_STYLE: dict[str, str] = {"en": "structured", "es": "telegraphic"}

_LUNG = frozenset({"pleural_effusion", "pneumothorax", "consolidation", "nodule", "edema"})

ENGLISH = Vocabulary(
    lang="en",
    headers=("FINDINGS:", "IMPRESSION:"),
    findings={
        "cardiomegaly": FindingWords(
            full=Phrases(
                positive=(
                    "There is {sev} cardiomegaly.",
                    "The cardiac silhouette is enlarged, consistent with {sev} cardiomegaly.",
                    "{sev} enlargement of the cardiac silhouette.",
                    "The heart is enlarged ({sev} cardiomegaly).",
                ),
                uncertain=(
                    "Possible mild cardiomegaly.",
                    "Heart size is at the upper limits of normal; mild cardiomegaly cannot be excluded.",
                    "Borderline enlarged cardiac silhouette.",
                ),
                negative=(
                    "Heart size is normal.",
                    "The cardiac silhouette is within normal limits.",
                    "No cardiomegaly.",
                    "The heart is not enlarged.",
                ),
            ),
            short=Phrases(
                positive=("{sev} cardiomegaly", "cardiomegaly", "enlarged cardiac silhouette"),
                uncertain=("possible mild cardiomegaly", "borderline cardiomegaly"),
                negative=("no cardiomegaly", "normal heart size"),
            ),
            severity={"mild": ("mild",), "moderate": ("moderate",), "severe": ("marked", "severe")},
        ),
        "pleural_effusion": FindingWords(
            full=Phrases(
                positive=(
                    "There is a {sev} {side} pleural effusion.",
                    "{sev} {side} pleural effusion with blunting of the costophrenic angle.",
                    "A {sev} {side} pleural effusion is present.",
                    "{side} pleural effusion, {sev} in size.",
                ),
                uncertain=(
                    "Possible small {side} pleural effusion.",
                    "Blunting of the {side} costophrenic angle may represent a small pleural effusion.",
                    "A trace {side} pleural effusion cannot be excluded.",
                ),
                negative=("No pleural effusion.", "There is no pleural effusion.", "No evidence of pleural effusion."),
            ),
            short=Phrases(
                positive=("{sev} {side} pleural effusion", "{sev} {side} effusion"),
                uncertain=("possible small {side} pleural effusion", "questionable {side} effusion"),
                negative=("no pleural effusion", "no effusion"),
            ),
            severity={"mild": ("small", "trace"), "moderate": ("moderate",), "severe": ("large",)},
            side={"right": ("right",), "left": ("left",), "bilateral": ("bilateral",)},
        ),
        "pneumothorax": FindingWords(
            full=Phrases(
                positive=(
                    "There is a {sev} {side} pneumothorax.",
                    "{sev} {side} apical pneumothorax with a visible pleural line.",
                    "A {side} pneumothorax is present, {sev} in size.",
                ),
                uncertain=(
                    "Possible tiny {side} apical pneumothorax.",
                    "A small {side} pneumothorax cannot be excluded.",
                ),
                negative=("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
            ),
            short=Phrases(
                positive=("{sev} {side} pneumothorax", "{side} pneumothorax"),
                uncertain=("possible tiny {side} pneumothorax",),
                negative=("no pneumothorax",),
            ),
            severity={"mild": ("small", "tiny"), "moderate": ("moderate",), "severe": ("large",)},
            side={"right": ("right",), "left": ("left",)},
        ),
        "consolidation": FindingWords(
            full=Phrases(
                positive=(
                    "There is {sev} consolidation in {loc}.",
                    "{sev} airspace consolidation in {loc}, concerning for pneumonia.",
                    "Focal consolidation is seen in {loc}.",
                    "Airspace opacity in {loc} consistent with {sev} consolidation.",
                ),
                uncertain=(
                    "Possible early consolidation in {loc}.",
                    "Subtle opacity in {loc}; consolidation cannot be excluded.",
                ),
                negative=(
                    "No focal consolidation.",
                    "There is no focal airspace consolidation.",
                    "No consolidation.",
                ),
            ),
            short=Phrases(
                positive=("{sev} consolidation in {loc}", "consolidation in {loc}"),
                uncertain=("possible consolidation in {loc}",),
                negative=("no consolidation", "no focal consolidation"),
            ),
            severity={"mild": ("mild", "patchy"), "moderate": ("moderate",), "severe": ("extensive", "dense")},
        ),
        "nodule": FindingWords(
            full=Phrases(
                positive=(
                    "There is a nodule measuring {size} mm in {loc}.",
                    "{size} mm pulmonary nodule projecting over {loc}.",
                    "A rounded {size} mm nodular opacity is seen in {loc}.",
                ),
                uncertain=(
                    "Possible small nodule in {loc}.",
                    "Questionable {size} mm nodular opacity in {loc}.",
                ),
                negative=("No pulmonary nodules.", "No suspicious pulmonary nodule or mass."),
            ),
            short=Phrases(
                positive=("{size} mm nodule in {loc}", "nodule in {loc}"),
                uncertain=("possible nodule in {loc}",),
                negative=("no nodules",),
            ),
            followup=("Recommend chest CT for further characterization of the nodule.",),
        ),
        "edema": FindingWords(
            full=Phrases(
                positive=(
                    "There is {sev} pulmonary edema.",
                    "Perihilar haziness and indistinct vessels consistent with {sev} pulmonary edema.",
                    "{sev} interstitial and alveolar edema in a perihilar distribution.",
                ),
                uncertain=(
                    "Possible mild pulmonary edema.",
                    "Mild vascular congestion; early pulmonary edema is not excluded.",
                ),
                negative=("No pulmonary edema.", "No evidence of pulmonary edema."),
            ),
            short=Phrases(
                positive=("{sev} pulmonary edema", "pulmonary edema"),
                uncertain=("possible mild edema",),
                negative=("no edema",),
            ),
            severity={"mild": ("mild",), "moderate": ("moderate",), "severe": ("severe", "marked")},
        ),
    },
    locations={
        ("upper", "right"): ("the right upper lobe", "the right upper zone"),
        ("middle", "right"): ("the right middle lobe", "the right mid lung"),
        ("lower", "right"): ("the right lower lobe", "the right base"),
        ("upper", "left"): ("the left upper lobe", "the left upper zone"),
        ("middle", "left"): ("the lingula", "the left mid lung"),
        ("lower", "left"): ("the left lower lobe", "the left base"),
        ("upper", "bilateral"): ("both upper lobes", "the upper lobes bilaterally"),
        ("lower", "bilateral"): ("both lower lobes", "both lung bases"),
    },
    normal=(
        Statement("The lungs are clear.", "lungs clear", _LUNG),
        Statement("The heart size is normal.", "normal heart size", frozenset({"cardiomegaly"})),
        Statement("The mediastinal contours are normal.", "normal mediastinum", frozenset({"cardiomegaly"})),
        Statement("The hila are unremarkable.", "normal hila", frozenset({"edema"})),
        Statement("No acute osseous abnormality.", "no acute osseous abnormality"),
        Statement(
            "No focal consolidation, pleural effusion, or pneumothorax.",
            "no consolidation, effusion or pneumothorax",
            frozenset({"consolidation", "pleural_effusion", "pneumothorax"}),
        ),
        Statement(
            "No pleural effusion or pneumothorax.",
            "no effusion or pneumothorax",
            frozenset({"pleural_effusion", "pneumothorax"}),
        ),
        Statement("The costophrenic angles are sharp.", "sharp costophrenic angles", frozenset({"pleural_effusion"})),
        Statement("Pulmonary vascularity is within normal limits.", "normal vascularity", frozenset({"edema"})),
        Statement("Lung volumes are normal.", "normal lung volumes"),
    ),
    all_clear=Phrases(
        positive=(
            "No acute cardiopulmonary process.",
            "No acute cardiopulmonary abnormality.",
            "Normal chest radiograph.",
        ),
        uncertain=(),
        negative=(),
    ),
    technique=(
        "PA and lateral views of the chest.",
        "Frontal and lateral chest radiographs were obtained.",
        "Single frontal view of the chest.",
        "Portable AP chest radiograph.",
    ),
    technique_short=("pa and lateral", "portable ap view"),
    closing=("Clinical correlation is recommended.", "Comparison: none."),
)

SPANISH = Vocabulary(
    lang="es",
    headers=("HALLAZGOS:", "CONCLUSIÓN:"),
    findings={
        "cardiomegaly": FindingWords(
            full=Phrases(
                positive=(
                    "Se observa cardiomegalia {sev}.",
                    "Silueta cardiaca aumentada de tamaño, compatible con cardiomegalia {sev}.",
                    "Índice cardiotorácico aumentado por cardiomegalia {sev}.",
                ),
                uncertain=("Posible cardiomegalia leve.", "No se descarta cardiomegalia leve."),
                negative=(
                    "Índice cardiotorácico normal.",
                    "No hay cardiomegalia.",
                    "Silueta cardiaca de tamaño normal.",
                ),
            ),
            short=Phrases(
                positive=(
                    "cardiomegalia {sev}",
                    "cardiomegalia",
                    "índice cardiotorácico aumentado por cardiomegalia",
                ),
                uncertain=("posible cardiomegalia", "no se descarta cardiomegalia leve", "cardiomegalia dudosa"),
                negative=("sin cardiomegalia", "índice cardiotorácico normal", "no cardiomegalia"),
            ),
            severity={
                "mild": ("leve", "ligera"),
                "moderate": ("moderada",),
                "severe": ("severa", "importante", "marcada"),
            },
        ),
        "pleural_effusion": FindingWords(
            full=Phrases(
                positive=(
                    "Se observa derrame pleural {side} {sev}.",
                    "Derrame pleural {side} {sev} que borra el seno costofrénico.",
                    "Existe un derrame pleural {side} {sev}.",
                ),
                uncertain=(
                    "Posible derrame pleural {side} mínimo.",
                    "Pinzamiento del seno costofrénico {side}; no se descarta derrame pleural.",
                ),
                negative=("Sin derrame pleural.", "No se observa derrame pleural.", "No hay derrame pleural."),
            ),
            short=Phrases(
                positive=(
                    "derrame pleural {side} {sev}",
                    "derrame pleural {side}",
                    "pinzamiento del seno costofrénico {side} por derrame pleural {sev}",
                ),
                uncertain=(
                    "posible derrame pleural {side} mínimo",
                    "pinzamiento del seno costofrénico {side}, no se descarta derrame",
                ),
                negative=("sin derrame pleural", "no se observa derrame pleural", "no derrame"),
            ),
            severity={
                "mild": ("leve", "pequeño", "de pequeña cuantía"),
                "moderate": ("moderado", "de moderada cuantía"),
                "severe": ("importante", "masivo", "de gran cuantía"),
            },
            side={"right": ("derecho",), "left": ("izquierdo",), "bilateral": ("bilateral",)},
        ),
        "pneumothorax": FindingWords(
            full=Phrases(
                positive=(
                    "Se observa neumotórax {side} {sev}.",
                    "Neumotórax {side} {sev} con línea pleural visible.",
                    "Existe un neumotórax apical {side} {sev}.",
                ),
                uncertain=("Posible neumotórax apical {side} mínimo.", "No se descarta pequeño neumotórax {side}."),
                negative=("Sin neumotórax.", "No se observa neumotórax.", "No hay neumotórax."),
            ),
            short=Phrases(
                positive=("neumotórax {side} {sev}", "neumotórax apical {side}", "neumotórax {side}"),
                uncertain=("posible neumotórax apical {side}", "no se descarta pequeño neumotórax {side}"),
                negative=("sin neumotórax", "no se observa neumotórax", "no neumotórax"),
            ),
            severity={"mild": ("pequeño", "leve"), "moderate": ("moderado",), "severe": ("importante", "masivo")},
            side={"right": ("derecho",), "left": ("izquierdo",)},
        ),
        "consolidation": FindingWords(
            full=Phrases(
                positive=(
                    "Consolidación {sev} en {loc}.",
                    "Se observa una condensación {sev} en {loc}, sugestiva de neumonía.",
                    "Aumento de densidad en {loc} compatible con consolidación.",
                ),
                uncertain=(
                    "Posible consolidación incipiente en {loc}.",
                    "Tenue aumento de densidad en {loc}; no se descarta consolidación.",
                ),
                negative=("Sin consolidaciones.", "No se observan condensaciones.", "Sin signos de consolidación."),
            ),
            short=Phrases(
                positive=("consolidación {sev} en {loc}", "condensación en {loc}", "consolidación en {loc}"),
                uncertain=("posible consolidación en {loc}", "no se descarta condensación en {loc}"),
                negative=("sin consolidaciones", "no se observan condensaciones", "sin condensaciones"),
            ),
            severity={"mild": ("leve", "pequeña"), "moderate": ("moderada",), "severe": ("extensa", "densa")},
            followup=("Control radiológico tras tratamiento.",),
        ),
        "nodule": FindingWords(
            full=Phrases(
                positive=(
                    "Nódulo pulmonar de {size} mm en {loc}.",
                    "Se observa un nódulo de {size} mm en {loc}.",
                    "Imagen nodular de {size} mm en {loc}.",
                ),
                uncertain=("Posible nódulo en {loc}.", "Dudosa imagen nodular en {loc}."),
                negative=("Sin nódulos pulmonares.", "No se observan nódulos."),
            ),
            short=Phrases(
                positive=("nódulo pulmonar de {size} mm en {loc}", "nódulo en {loc}", "imagen nodular en {loc}"),
                uncertain=("posible nódulo en {loc}", "dudosa imagen nodular en {loc}"),
                negative=("sin nódulos", "no se observan nódulos"),
            ),
            followup=("Se recomienda TC de tórax para completar estudio.",),
        ),
        "edema": FindingWords(
            full=Phrases(
                positive=(
                    "Edema pulmonar {sev}.",
                    "Patrón alveolar perihiliar bilateral compatible con edema pulmonar {sev}.",
                    "Signos de edema pulmonar {sev} con redistribución vascular.",
                ),
                uncertain=(
                    "Posible edema pulmonar leve.",
                    "Redistribución vascular; no se descarta edema incipiente.",
                ),
                negative=("Sin signos de edema.", "No hay edema pulmonar."),
            ),
            short=Phrases(
                positive=(
                    "edema pulmonar {sev}",
                    "edema agudo de pulmón",
                    "patrón en alas de mariposa por edema pulmonar",
                ),
                uncertain=("posible edema pulmonar leve", "no se descarta edema incipiente"),
                negative=("sin signos de edema", "no edema pulmonar"),
            ),
            severity={"mild": ("leve", "incipiente"), "moderate": ("moderado",), "severe": ("severo", "importante")},
        ),
    },
    locations={
        ("upper", "right"): ("lóbulo superior derecho", "campo superior derecho"),
        ("middle", "right"): ("lóbulo medio", "campo medio derecho"),
        ("lower", "right"): ("lóbulo inferior derecho", "base derecha"),
        ("upper", "left"): ("lóbulo superior izquierdo", "campo superior izquierdo"),
        ("middle", "left"): ("língula", "campo medio izquierdo"),
        ("lower", "left"): ("lóbulo inferior izquierdo", "base izquierda"),
        ("upper", "bilateral"): ("ambos lóbulos superiores", "ambos campos superiores"),
        ("lower", "bilateral"): ("ambos lóbulos inferiores", "ambas bases"),
    },
    normal=(
        Statement("Pulmones bien aireados.", "pulmones bien aireados", _LUNG - {"nodule"}),
        Statement(
            "No se observan alteraciones pleuropulmonares agudas.", "sin alteraciones pleuroparenquimatosas", _LUNG
        ),
        Statement("Senos costofrénicos libres.", "senos costofrénicos libres", frozenset({"pleural_effusion"})),
        Statement(
            "Silueta cardiomediastínica normal.", "silueta cardiomediastínica normal", frozenset({"cardiomegaly"})
        ),
        Statement("Hilios de morfología normal.", "hilios normales", frozenset({"edema"})),
        Statement("Estructuras óseas sin alteraciones.", "estructuras óseas sin alteraciones"),
        Statement(
            "Sin derrame pleural ni neumotórax.",
            "sin derrame pleural ni neumotórax",
            frozenset({"pleural_effusion", "pneumothorax"}),
        ),
    ),
    all_clear=Phrases(
        positive=(
            "Sin hallazgos radiológicos significativos.",
            "Radiografía de tórax sin alteraciones.",
            "Sin hallazgos significativos.",
        ),
        uncertain=(),
        negative=(),
    ),
    technique=("Radiografía de tórax en proyecciones PA y lateral.", "Radiografía de tórax AP portátil."),
    technique_short=("rx tórax pa y lateral", "rx tórax ap portátil", "proyección pa"),
    closing=("Se recomienda correlación clínica.", "Valorar según clínica."),
)

VOCABULARIES: dict[str, Vocabulary] = {v.lang: v for v in (ENGLISH, SPANISH)}


def get_style(style: ReportStyle | str | None, lang: str) -> ReportStyle:
    """A style by name (None: the language community's default), or the style given."""
    if isinstance(style, ReportStyle):
        return style
    name = DEFAULT_STYLE[lang] if style is None else style
    if name not in STYLES:
        close = difflib.get_close_matches(name, list(STYLES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown report style '{name}'; {hint}available: {', '.join(STYLES)}")
    return STYLES[name]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _tidy(text: str) -> str:
    """Collapse the gaps left by empty slots ("a  pneumothorax", "effusion ,")."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"\s+([,.;)])", r"\1", text)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _mention(f: Finding, size_mm: int, vocab: Vocabulary, register: str, rng: np.random.Generator) -> str:
    """One positive mention; ``size_mm`` is drawn once per report so both sections agree."""
    words = vocab.findings[f.name]
    phrases = words.full if register == "full" else words.short
    templates = phrases.uncertain if f.uncertain else phrases.positive
    slots = {
        "sev": _pick(rng, words.severity[f.severity]) if words.severity else "",
        "side": _pick(rng, words.side[f.laterality]) if f.laterality in words.side else "",
        "loc": _pick(rng, vocab.locations[(f.zone, f.laterality)]) if f.zone else "",
        "size": str(size_mm),
    }
    return _tidy(_pick(rng, templates).format_map(slots))


def write_report(
    findings: Mapping[str, Finding],
    lang: str,
    rng: np.random.Generator,
    style: ReportStyle | str | None = None,
) -> str:
    """Write one report for a finding set in ``lang`` ("en" or "es").

    ``findings`` maps each positive finding to its :class:`Finding` (laterality, severity,
    zone, uncertainty); use :func:`medunic_core.data.synthetic.generator.specify_findings`
    to get one from bare names. ``style`` is a :class:`ReportStyle`, a name in
    :data:`STYLES`, or None for the language community's habit (:data:`DEFAULT_STYLE`).
    """
    if lang not in VOCABULARIES:
        raise ConfigError(f"no report vocabulary for language '{lang}'; available: {', '.join(VOCABULARIES)}")
    vocab, st = VOCABULARIES[lang], get_style(style, lang)
    full = st.register == "full"
    present = [findings[n] for n in FINDINGS if n in findings]
    order = [present[i] for i in rng.permutation(len(present))]
    sizes = [int(rng.integers(vocab.nodule_mm[f.severity][0], vocab.nodule_mm[f.severity][1] + 1)) for f in order]
    positives = [_mention(f, mm, vocab, st.register, rng) for f, mm in zip(order, sizes)]
    summary = [_mention(f, mm, vocab, "short", rng) for f, mm in zip(order, sizes)] if st.sections else []

    # Normal statements that no positive finding contradicts, none repeating an earlier one.
    names = {f.name for f in present}
    allowed = [s for s in vocab.normal if not (s.rules_out & names)]
    wanted = int(rng.integers(st.normal_statements[0], st.normal_statements[1] + 1))
    others: list[str] = []
    covered: set[str] = set()
    for i in rng.permutation(len(allowed)):
        s = allowed[i]
        if len(others) < wanted and not (s.rules_out and s.rules_out <= covered):
            others.append(s.full if full else s.short)
            covered |= s.rules_out
    for name in FINDINGS:
        if name not in names and name not in covered and rng.random() < st.p_negative:
            words = vocab.findings[name]
            others.append(_pick(rng, (words.full if full else words.short).negative))
    others = [others[i] for i in rng.permutation(len(others))]

    followups = [
        _pick(rng, vocab.findings[f.name].followup)
        for f in order
        if vocab.findings[f.name].followup and rng.random() < st.p_followup
    ]
    opening = []
    if rng.random() < st.p_technique:
        opening.append(_pick(rng, vocab.technique if full else vocab.technique_short))
    closing = [_pick(rng, vocab.closing)] if rng.random() < st.p_closing else []
    all_clear = []
    if not present and (rng.random() < st.p_all_clear or not (others or st.sections)):
        all_clear = [_pick(rng, vocab.all_clear.positive)]

    if st.sections:
        body = opening + (positives + others or all_clear)
        impression = (summary or all_clear) + followups + closing
        parts = [vocab.headers[0], *map(_sentence, body), vocab.headers[1], *map(_sentence, impression)]
    else:
        parts = [_sentence(s) for s in opening + positives + all_clear + others + followups + closing]
    text = " ".join(parts)
    return text.lower() if st.lowercase else text


def _sentence(text: str) -> str:
    text = _capitalise(text.strip())
    return text if text.endswith(".") else text + "."
