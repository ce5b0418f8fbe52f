"""Settings come from CLI flags over AIGC_* environment variables over defaults; bad values fail at start-up."""

from __future__ import annotations

import pytest

from model_core import native
from service.config import Settings, parse_settings


def test_env_then_flags_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_PORT", "9100")
    monkeypatch.setenv("AIGC_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("AIGC_API_KEYS", "a, b")
    s = parse_settings(["--port", "9200", "--dtype", "float32"])
    assert (s.port, s.max_num_seqs, s.dtype, s.api_keys) == (9200, 8, "float32", ["a", "b"])
    assert Settings().host == "127.0.0.1"


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--port", "70000"], "port"),
        (["--dtype", "int4"], "dtype"),
        (["--device", "tpu"], "device"),
        (["--kernels", "sse9"], "kernels"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
        (["--max-num-seqs", "64", "--max-num-batched-tokens", "32"], "max_num_batched_tokens"),
        (["--api-key-file", "/nonexistent/keys"], "api_key_file"),
    ],
)
def test_invalid_settings_stop_start_up_naming_the_option(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and option in err


def test_kernels_from_env_and_a_build_this_cpu_cannot_run_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.main import build_text_model

    monkeypatch.setenv("AIGC_KERNELS", "torch")
    assert parse_settings([]).kernels == "torch"
    from typing import get_args

    from model_core.backend import CHOICES

    assert set(get_args(Settings.model_fields["kernels"].annotation)) == set(CHOICES)  # every build can be asked for
    other = next(isa for isa in native.ISAS if isa not in native.runnable())  # x86 never runs NEON, ARM never AVX2
    with pytest.raises(ValueError, match=f"kernels '{other}'"):
        build_text_model(Settings(kernels=other, enable_gan=False))
