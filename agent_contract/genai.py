"""Token accounting names shared by the runtime (which exposes them) and the operator (whose
rollout analysis reads them): the OpenTelemetry GenAI semantic conventions' client metrics, as
Prometheus names them (dots become underscores, the unit ``s`` becomes ``_seconds``, and the
annotation unit ``{token}`` adds no suffix)."""

from __future__ import annotations

# Histogram of tokens per call, with TOKEN_TYPE_LABEL "input" or "output".
TOKEN_USAGE_METRIC = "gen_ai_client_token_usage"  # noqa: S105 - a metric name
# Histogram of the duration of each model call, in seconds.
OPERATION_DURATION_METRIC = "gen_ai_client_operation_duration_seconds"

OPERATION_NAME_LABEL = "gen_ai_operation_name"  # "chat"
PROVIDER_LABEL = "gen_ai_provider_name"  # "openai"
REQUEST_MODEL_LABEL = "gen_ai_request_model"
TOKEN_TYPE_LABEL = "gen_ai_token_type"  # noqa: S105 - a label name
# On the duration of a call that failed: an HTTP status ("429"), "timeout", an exception's class
# name, or "cancelled" (the caller stopped it, e.g. a streaming client left); empty on success.
ERROR_TYPE_LABEL = "error_type"
INPUT_TOKENS = "input"
OUTPUT_TOKENS = "output"
