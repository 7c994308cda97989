"""Fuzzing the server from its own OpenAPI schema (schemathesis): in-process over ASGI, a tiny random model.

Every operation gets requests generated from /openapi.json, valid ones and invalid ones (wrong types,
out-of-range values, other HTTP methods). Whatever they hold, the server must answer without a 5xx,
with a status, a content type and a body that the schema documents (server-sent events included).
Each body is also sent again naming the served model with a small max_tokens, so that the fuzzed
fields reach generation instead of stopping at the 404 for an unknown model. Bounded and
derandomized: the same cases on every run, in seconds, nothing over the network.
"""

import json
import os

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from lmlab.config import ModelConfig, ServeConfig
from lmlab.data.tokenizer import train_tokenizer
from lmlab.models.registry import build_model
from lmlab.serve.app import create_app

MODEL = "tiny"
EXAMPLES = max(1, int(20 * float(os.environ.get("LMLAB_FUZZ_EXAMPLES", "1"))))  # benchmarks/hardening.py scales it
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def tiny_app():
    """The real app over a random 1-layer GPT with a byte tokenizer (any text encodes), small limits."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer("byte", [])
    model = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, block_size=64,
                                    vocab_size=tokenizer.vocab_size)).eval()
    cfg = ServeConfig(model_name=MODEL, max_new_tokens=16, default_max_tokens=4, max_batch_size=4, max_queue=16,
                      request_timeout=20)
    return create_app(model, tokenizer, cfg)


# at import: the tests are generated from the schema (schemathesis' lazy from_fixture does not run on this pytest)
app = tiny_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module", autouse=True)
def _stop_the_worker():
    yield
    app.state.serve.close()


def for_the_served_model(body):
    """The same body naming the served model, with max_tokens small enough to be accepted (None: not an object)."""
    if not isinstance(body, dict):
        return None
    body = {**body, "model": MODEL}
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and not isinstance(body[field], bool):
            body[field] = 1 + body[field] % 4
    return body


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error_or_an_undocumented_answer(case):
    record(case, case.call_and_validate(checks=CHECKS))
    if case.method == "POST" and (body := for_the_served_model(case.body)) is not None:
        case.body = body
        record(case, case.call_and_validate(checks=CHECKS))


def record(case, response) -> None:
    """Append the request's operation and status to $LMLAB_FUZZ_LOG (JSONL), for benchmarks/hardening.py."""
    path = os.environ.get("LMLAB_FUZZ_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"server": f"{case.method} {case.path}", "status": response.status_code}) + "\n")
