"""Third-party clients against the real default model (SmolLM2-135M-Instruct) for the API they use:
LangChain's `bind_tools` and `with_structured_output`, instructor in Mode.TOOLS, Mode.JSON_SCHEMA and
Mode.JSON, openai-agents with a function tool over chat completions. Tool calls and structured replies
are generated under grammars, so what these clients parse always validates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field, ValidationError

from service.config import Settings
from service.main import build_text_model, create_app
from tests.service.server_utils import LiveServer, serve

pytestmark = pytest.mark.heavy  # the real model behind third-party clients (make test-fast skips it)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "user"]


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    settings = Settings(max_model_len=2048, kv_cache_memory_gb=0.25, max_num_seqs=8, enable_gan=False)
    with serve(create_app(settings, text_model=build_text_model(settings))) as live:
        yield live


@pytest.fixture(scope="module")
def model(server: LiveServer) -> str:
    return server.text_model.name


def test_langchain_bind_tools_and_with_structured_output(server: LiveServer, model: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="x",
        model=model,
        max_tokens=200,  # type: ignore[arg-type]
        temperature=0,
        max_retries=0,
    )
    msg = llm.bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False).invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert {"city", "unit"} <= set(msg.tool_calls[0]["args"])  # LangChain's schema admits more properties
    person = llm.with_structured_output(Person, method="json_schema").invoke("Describe a person.")
    assert isinstance(person, Person)


def test_instructor_tools_and_json_modes(server: LiveServer, model: str) -> None:
    import instructor
    from instructor.core import InstructorRetryException

    raw = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        person = instructor.from_openai(raw, mode=mode).chat.completions.create(
            model=model,
            response_model=Person,
            messages=[{"role": "user", "content": "A person, please."}],
            max_tokens=300,
            temperature=0,
            max_retries=0,
        )
        assert isinstance(person, Person), mode
    # Mode.JSON sends response_format json_object and the schema in the prompt: the reply is a JSON object;
    # whether it holds Person's fields is the model's doing, so either outcome is accepted here
    seen: list[Any] = []
    client = instructor.from_openai(raw, mode=instructor.Mode.JSON)
    client.on("completion:response", seen.append)
    try:
        assert isinstance(
            client.chat.completions.create(
                model=model,
                response_model=Person,
                max_retries=0,
                max_tokens=300,
                temperature=0,
                messages=[{"role": "user", "content": "A person, please."}],
            ),
            Person,
        )
    except (InstructorRetryException, ValidationError):
        pass
    assert seen and isinstance(json.loads(seen[0].choices[0].message.content), dict)


def test_openai_agents_with_a_function_tool_over_chat_completions(server: LiveServer, model: str) -> None:
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[dict[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append({"city": city})
        return f"sunny in {city}"

    model = OpenAIChatCompletionsModel(
        model=model, openai_client=openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", max_tokens=200, temperature=0, parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "Weather in Lima?", max_turns=4)
    assert calls and isinstance(calls[0]["city"], str)
    assert isinstance(result.final_output, str)


def test_openai_agents_with_a_function_tool_over_the_responses_api(server: LiveServer, model: str) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    responses_model = OpenAIResponsesModel(
        model=model, openai_client=openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
    )
    agent = Agent(
        name="weather",
        instructions="Answer with the weather.",
        model=responses_model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", max_tokens=200, temperature=0, parallel_tool_calls=False),
    )
    result = Runner.run_sync(agent, "Weather in Lima?", max_turns=4)
    assert calls and all(isinstance(c, str) for c in calls)
    assert isinstance(result.final_output, str) and result.final_output
