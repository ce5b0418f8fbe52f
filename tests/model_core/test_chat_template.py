"""Chat templates: the default model's and a custom one render as Hugging Face's do; errors and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_core.chat_template import ChatTemplateError, render_chat_template
from model_core.tokenizer import Tokenizer
from tests.model_core.tokenizer_cases import CONVERSATIONS, hf_tokenizer, smollm2_path, write_tiny_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def hf():
    return hf_tokenizer(smollm2_path())


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(ours: Tokenizer, hf, messages: list[dict], add_generation_prompt: bool) -> None:
    gen = add_generation_prompt
    got = ours.apply_chat_template(messages, add_generation_prompt=gen)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert got == want
    assert got.endswith("<|im_start|>assistant\n") == add_generation_prompt


LLAMA2_STYLE = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}\n"
    "{% for message in loop_messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {% endif %}\n"
    "    {% if loop.index0 == 0 and sys is defined %}"
    "{% set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}\n"
    "    {% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}\n"
    "    {% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}\n"
    "{% endfor %}{{ {'n': messages | length, 'x': 'é'} | tojson }}"
)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_custom_template_matches_hf(ours: Tokenizer, hf, messages: list[dict]) -> None:
    """Whitespace control (trim_blocks/lstrip_blocks), bos/eos variables and tojson behave like HF."""
    got = ours.apply_chat_template(messages, chat_template=LLAMA2_STYLE)
    want = hf.apply_chat_template(messages, chat_template=LLAMA2_STYLE, tokenize=False, add_generation_prompt=True)
    assert got == want


def test_raise_exception_and_missing_template(ours: Tokenizer, tmp_path: Path) -> None:
    bad = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ours.apply_chat_template(bad, chat_template=LLAMA2_STYLE)
    plain = Tokenizer.from_pretrained_dir(write_tiny_dir(tmp_path, with_template=False))
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_sandbox_blocks_malicious_template(ours: Tokenizer, template: str) -> None:
    from jinja2.sandbox import SecurityError

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as err:
        ours.apply_chat_template(messages, chat_template=template)
    assert isinstance(err.value.__cause__, SecurityError)
    assert messages == [{"role": "user", "content": "hi"}]


def test_render_without_a_model() -> None:
    """The environment HF gives templates: whitespace control, loop controls, {% generation %}, tojson."""
    source = (
        "{% for m in messages %}{% if m.skip %}{% continue %}{% endif %}\n"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}\n"
        "{% endfor %}{{ bos_token if add_generation_prompt else '' }}"
    )
    messages = [{"content": "é"}, {"content": "x", "skip": True}, {"content": [1, "b"]}]
    variables = {"messages": messages, "add_generation_prompt": True, "bos_token": "<s>"}
    assert render_chat_template(source, variables) == '"é"[1, "b"]<s>'
    with pytest.raises(ChatTemplateError, match="chat template error: no"):
        render_chat_template("{{ raise_exception('no') }}", {})
    with pytest.raises(ChatTemplateError, match="chat template error"):
        render_chat_template("{% for %}", {})
    with pytest.raises(ChatTemplateError, match="unsafe"):
        render_chat_template("{{ messages.__class__ }}", {"messages": []})
