"""The message format between the coordinator and a site (DESIGN.md, "What travels").

Record names, config and metric keys, and message types are named here once, so that the
ClientApp that writes a record and the ServerApp that reads it cannot drift apart.
"""

from __future__ import annotations

import numpy as np

# -- records of a message (RecordDict keys) --------------------------------------------
ARRAYS = "arrays"  # ArrayRecord: the travelling weights
METRICS = "metrics"  # MetricRecord: NUM_EXAMPLES and losses or evaluation metrics
CONFIG = "config"  # ConfigRecord, coordinator -> site: the keys below
ALIGN = "align"  # ArrayRecord: alignment sums, "<community>/<key>" (medunic_core.align)
USAGE = "usage"  # ArrayRecord: TOKEN_ROWS, one flag per token-embedding row the site used
SITE = "site"  # ConfigRecord: SITE_NAME and COMMUNITY, in every reply
PRIVACY = "privacy"  # ConfigRecord: what an update-level DP release has spent (medunic_core.privacy)
VOCAB_PREFIX = "vocab."  # ConfigRecord per language: WORDS, DF, REPORTS (vocabulary stage)

# -- keys -------------------------------------------------------------------------------
SERVER_ROUND = "server-round"
VOCAB_SHA = "vocab-sha"
ENCODER_SHA = "encoder-sha"  # the run's MLM text encoder (medunic_core.export.folder_sha256), when it has one
APP_VERSION = "app-version"
RUN_KEY = "run-key"
BATCHES = "batches"  # statistics pass: how many batches
STAGE = "stage"
STAGE_OVERRIDES = "stage-overrides"  # simulation: the coordinator's overrides made as the run goes (runconfig.py)
SITE_NAME = "site"
COMMUNITY = "community"
NUM_EXAMPLES = "num-examples"  # Flower's FedAvg weights by this metric
TOKEN_ROWS = "token_rows"
WORDS, DF, REPORTS = "words", "df", "reports"

# -- message types: Flower's "train", "evaluate", "query", and "<type>.<action>" ---------
TRAIN, EVALUATE, QUERY = "train", "evaluate", "query"
MLM, STATS, COMMUNITY_STATS, VOCAB = "mlm", "stats", "community", "vocab"  # actions (ClientApp decorators)
TRAIN_MLM = f"{TRAIN}.{MLM}"  # the MLM stage's training round
QUERY_STATS = f"{QUERY}.{STATS}"  # statistics-only pass (align.round1 = stats)
QUERY_COMMUNITY = f"{QUERY}.{COMMUNITY_STATS}"  # per-language P_l statistics (align.eval_norm = community)
QUERY_VOCAB = f"{QUERY}.{VOCAB}"  # the vocabulary stage

# -- weights on the wire -----------------------------------------------------------------
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
