"""The routing table (service.api.model_table): which model answers a request's `model` at each endpoint, the
404 naming that endpoint's models, the 400 naming the LMs when none is named and there are several, the 503s while
a model that is not an LM is not ready, and the /v1/models entries, on stand-in models (no engine runs here; the
routes over a real server are in test_api.py, test_g2p_api.py and test_multi_model.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from service.api.errors import APIError
from service.api.model_registry import Budget, LMSlot, ModelRegistry, Status
from service.api.model_specs import ModelSpec
from service.api.model_table import G2P_MODEL, IMAGE_MODEL, Endpoint, Kind, model_table, route
from service.api.state import ServerState
from service.config import Settings

LM = "my-lm"


def _slot(name: str, loaded: bool) -> LMSlot:
    slot = LMSlot(ModelSpec(name, f"/models/{name}.gguf", f"model {name}", 1000), build=None)
    if loaded:
        slot.status = Status.LOADED
        slot.model = SimpleNamespace(  # type: ignore[assignment]
            name=name, max_model_len=64, dtype="float32", kernels="torch", batch_invariant=False, created=1
        )
    return slot


def _state(
    lm: bool = True, g2p: bool | None = True, images: bool | None = None, more_lms: tuple[str, ...] = ()
) -> ServerState:
    """A server's state with stand-ins: the LM loaded or not (and more LMs, not loaded); the G2P and image models
    absent (None), stopped (False) or running (True)."""
    state = ServerState(Settings(enable_gan=False))
    slots = [_slot(LM, lm), *(_slot(name, False) for name in more_lms)]
    state.models = ModelRegistry(slots, Budget(), lambda tm, why: None)
    if g2p is not None:
        cfg = SimpleNamespace(max_word_len=20, max_phones=30)
        state.g2p_batcher = SimpleNamespace(running=g2p, g2p=SimpleNamespace(config=cfg))  # type: ignore[assignment]
    if images is not None:
        state.image_batcher = SimpleNamespace(running=images)  # type: ignore[assignment]
    return state


def _request(state: ServerState) -> Any:
    return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(server=state)))


def _refused(state: ServerState, endpoint: Endpoint, model: str | None) -> APIError:
    with pytest.raises(APIError) as e:
        route(_request(state), endpoint, model)
    return e.value


def test_each_endpoint_routes_to_its_models() -> None:
    state = _state(images=True)
    rq = _request(state)
    assert route(rq, Endpoint.COMPLETIONS, None).id == LM  # no model: the LM
    assert route(rq, Endpoint.COMPLETIONS, LM).kind is Kind.TEXT
    g2p = route(rq, Endpoint.COMPLETIONS, G2P_MODEL)
    assert g2p.kind is Kind.SEQ2SEQ and g2p.seq2seq is state.g2p_batcher and g2p.lm is None
    for endpoint in (Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.TOKENIZE):
        assert route(rq, endpoint, None).lm is state.models.get(LM)
    assert route(rq, Endpoint.IMAGES, None).images is state.image_batcher
    assert route(rq, Endpoint.IMAGES, IMAGE_MODEL).kind is Kind.IMAGE


def test_an_unknown_model_is_a_404_naming_the_endpoints_models() -> None:
    state = _state(images=True)
    err = _refused(state, Endpoint.COMPLETIONS, "nope")
    assert (err.status_code, err.param, err.code) == (404, "model", "model_not_found")
    assert f"'{LM}', '{G2P_MODEL}'" in err.message and IMAGE_MODEL not in err.message
    err = _refused(state, Endpoint.CHAT, G2P_MODEL)  # only /v1/completions serves it
    assert err.status_code == 404 and f"available: '{LM}'" in err.message and G2P_MODEL in err.message
    err = _refused(state, Endpoint.IMAGES, LM)
    assert err.status_code == 404 and f"available for images: '{IMAGE_MODEL}'" in err.message


def test_several_lms_need_a_model_named_and_each_is_routed_by_its_id() -> None:
    state = _state(more_lms=("other-lm",))
    rq = _request(state)
    for endpoint in (Endpoint.COMPLETIONS, Endpoint.CHAT, Endpoint.RESPONSES, Endpoint.TOKENIZE):
        err = _refused(state, endpoint, None)
        assert (err.status_code, err.param, err.code) == (400, "model", "model_required")
        assert f"'{LM}', 'other-lm'" in err.message and G2P_MODEL not in err.message
        assert route(rq, endpoint, "other-lm").lm is state.models.get("other-lm")
    assert route(rq, Endpoint.COMPLETIONS, G2P_MODEL).kind is Kind.SEQ2SEQ  # the other kinds are unchanged
    err = _refused(state, Endpoint.CHAT, "nope")
    assert err.status_code == 404 and f"available: '{LM}', 'other-lm'" in err.message


def test_an_lm_not_loaded_is_routed_and_other_models_not_ready_are_503s() -> None:
    loading = _state(lm=False)
    for endpoint in (Endpoint.COMPLETIONS, Endpoint.CHAT):
        assert route(_request(loading), endpoint, None).id == LM  # routed: the route loads it (lm_for)
        err = _refused(loading, endpoint, "whatever-the-lm-is-called")
        assert err.status_code == 404, (endpoint, err.message)
    assert route(_request(loading), Endpoint.COMPLETIONS, G2P_MODEL).kind is Kind.SEQ2SEQ  # served meanwhile
    err = _refused(_state(g2p=False), Endpoint.COMPLETIONS, G2P_MODEL)
    assert (err.status_code, err.code) == (503, "model_not_ready") and G2P_MODEL in err.message
    for images in (None, False):  # not enabled, or stopped
        err = _refused(_state(images=images), Endpoint.IMAGES, None)
        assert (err.status_code, err.code) == (503, "model_not_ready")
    err = _refused(_state(g2p=None), Endpoint.COMPLETIONS, G2P_MODEL)  # not enabled: not a model here
    assert err.status_code == 404


def test_the_table_lists_the_lms_first_with_each_models_entry() -> None:
    state = _state(images=False, more_lms=("other-lm",))
    state.models.get("other-lm").error = "cannot load model other-lm: corrupt"  # type: ignore[union-attr]
    table = model_table(state)
    assert [(m.id, m.ready) for m in table] == [
        (LM, True),
        ("other-lm", True),
        (G2P_MODEL, True),
        (IMAGE_MODEL, False),
    ]
    lm, other, g2p = table[0].entry(7), table[1].entry(7), table[2].entry(7)
    assert lm["kind"] == "text-generation" and lm["max_model_len"] == 64 and lm["created"] == 7
    assert lm["status"] == {"value": "loaded"} and lm["loaded"] is True
    assert other == {
        "id": "other-lm",
        "object": "model",
        "created": 7,
        "owned_by": "aigc",
        "kind": "text-generation",
        "status": {"value": "unloaded", "failed": True, "error": "cannot load model other-lm: corrupt"},
        "loaded": False,
    }
    table = table[1:]
    assert g2p["kind"] == "seq2seq" and (g2p["max_model_len"], g2p["max_output_tokens"]) == (20, 30)
    assert table[2].entry(7) == {
        "id": IMAGE_MODEL,
        "object": "model",
        "created": 7,
        "owned_by": "aigc",
        "kind": "image-generation",
    }
