"""Schemathesis against the app's own OpenAPI schema, over real HTTP on 127.0.0.1.

Every operation in the schema is fuzzed (the text routes on a tiny random LM with a 64-token context,
the image route on a tiny random GAN written to a temporary checkpoint), with both schema-valid and
schema-violating bodies. Checks: no server error (5xx; a 504 is allowed only when the body asked for a
`timeout`), every status code, content type, header and JSON body documented by the schema.

Not checked: that schema-violating bodies are always rejected (`"5"` for an integer is accepted, as
pydantic's lax mode does) or that schema-valid ones are always accepted (range limits are 400s).

Cases: `FUZZ_EXAMPLES` examples per operation (default 200; the five inputless GET routes take one each),
which with the explicit-example and coverage phases comes to well over 1,000 cases by default; the
count per operation is printed at the end of the module. `-m slow` runs `FUZZ_SLOW_EXAMPLES` (1000)
per operation.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks

from model_core.gan import GANConfig, Generator, save_gan
from model_core.tokenizer import Tokenizer
from service.api.text_model import TextModel
from service.config import Settings
from service.main import create_app
from tests.service.server_utils import TINY_MODEL_NAME, LiveServer, serve_model, text_model
from tests.utils import tiny_llama

pytestmark = pytest.mark.heavy  # schema fuzzing, thousands of requests (make test-fast skips it)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
FUZZ_SLOW_EXAMPLES = int(os.environ.get("FUZZ_SLOW_EXAMPLES", "1000"))
MIN_DEFAULT_CASES = 1000
CONTEXT = 64

# the schema of the very app that is served (built here without starting it)
schema = schemathesis.openapi.from_dict(create_app(Settings(enable_gan=True)).openapi())
OPERATIONS = [op.ok().label for op in schema.get_all_operations()]  # type: ignore[union-attr]
COUNTS: Counter[str] = Counter()
STATUSES: Counter[tuple[str, int]] = Counter()

load_all_checks()
_EXCLUDED = {"not_a_server_error", "negative_data_rejection", "positive_data_acceptance"}
CHECK_FUNCTIONS: list[Any] = list(CHECKS.get_by_names([n for n in CHECKS.get_all_names() if n not in _EXCLUDED]))


def no_server_error(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """5xx never, except the 504 a request gets for its own `timeout` running out."""
    if response.status_code < 500:
        return
    asked_timeout = isinstance(case.body, dict) and case.body.get("timeout") is not None
    if response.status_code == 504 and asked_timeout and response.json()["error"]["code"] == "timeout":
        return
    raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GAN checkpoint: the image route runs for real, without the shipped weights."""
    cfg = GANConfig(z_dim=8, embed_dim=4, g_width=4, d_width=4, image_size=32)
    return save_gan(Generator(cfg).eval(), tmp_path_factory.mktemp("gan"))


@pytest.fixture(scope="module")
def fuzz_server(smol_tokenizer: Tokenizer, gan_dir: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    model = tiny_llama(max_seq_len=CONTEXT)
    # a short queue: a request asking for more sequences than fit is a 400, so no case runs for long
    tm: TextModel = text_model(model, smol_tokenizer, max_num_seqs=16, max_waiting=16)
    with serve_model(tm, enable_gan=True, gan_path=str(gan_dir), max_body_bytes=256 * 1024) as live:
        assert live.app.state.server.image_batcher is not None, "the GAN did not load"
        yield live
        assert tm.engine.is_alive
        assert tm.engine.scheduler.block_pool.num_used == 0 and not tm.engine.scheduler.has_work
    total = sum(COUNTS.values())
    capture: Any = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\nschemathesis: {total} cases")
        for op, n in COUNTS.items():
            codes = ", ".join(f"{code}: {c}" for (o, code), c in sorted(STATUSES.items()) if o == op)
            print(f"  {op}: {n} ({codes})")
    if set(COUNTS) == set(OPERATIONS) and FUZZ_EXAMPLES >= 200:  # the whole default run took place
        assert total >= MIN_DEFAULT_CASES, COUNTS


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def steer(case: schemathesis.Case) -> None:
    """Random strings rarely name the served model or a digit: for half of them (even length), use a
    value that gets past those checks, so that generation runs too. Strings stay strings: a case that
    was schema-valid stays valid."""
    body = case.body
    if isinstance(body, dict):
        model, prompt, size = body.get("model"), body.get("prompt"), body.get("size")
        if isinstance(model, str) and len(model) % 2 == 0:
            body["model"] = TINY_MODEL_NAME
        if case.operation.path == "/v1/images/generations":
            if isinstance(prompt, str) and len(prompt) % 2 == 0:
                body["prompt"] = str(len(prompt) % 10)
            if isinstance(size, str) and len(size) % 2 == 0:
                body["size"] = "32x32"
    model_id = (case.path_parameters or {}).get("model_id")
    if isinstance(model_id, str) and len(model_id) % 2 == 0:
        case.path_parameters["model_id"] = TINY_MODEL_NAME  # type: ignore[index]


def run_case(case: schemathesis.Case, live: LiveServer, session: requests.Session) -> None:
    steer(case)
    response = case.call(base_url=live.base_url, session=session, timeout=60)
    case.validate_response(response, checks=[*CHECK_FUNCTIONS, no_server_error])
    COUNTS[case.operation.label] += 1
    STATUSES[case.operation.label, response.status_code] += 1


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
def test_schema_fuzz(case: schemathesis.Case, fuzz_server: LiveServer, session: requests.Session) -> None:
    run_case(case, fuzz_server, session)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=FUZZ_SLOW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schema_fuzz_long(case: schemathesis.Case, fuzz_server: LiveServer, session: requests.Session) -> None:
    run_case(case, fuzz_server, session)
