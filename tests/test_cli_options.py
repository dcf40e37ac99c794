"""The options `transcribe`, `evaluate` and `serve` share (`speechlm.cli_options`): same flags, same defaults, every
default shown in --help, each load option reaching the model, and --help without torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import soundfile as sf

import speechlm.loading
from speechlm import cli_options
from speechlm.cli import main
from speechlm.cli_options import DefaultsHelpFormatter, load_for_inference
from speechlm.configuration import DEFAULT_GENERATION
from speechlm.evaluation import add_evaluate_arguments
from speechlm.inference.cli import add_transcribe_arguments
from speechlm.joint_ctc import HEAD_CANDIDATES, LLM_CANDIDATES
from speechlm.serving.app import add_serve_arguments
from tests.conftest import make_clips
from tests.test_loading import quantized_linears, save_lora_model

ADDERS = {"transcribe": add_transcribe_arguments, "evaluate": add_evaluate_arguments, "serve": add_serve_arguments}
SHARED = ("model", "device", "dtype", "quantize", "prompt", "max_new_tokens", "num_beams")


def parser_for(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"speechlm {command}")
    ADDERS[command](parser)
    return parser


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def signature(action: argparse.Action) -> tuple:
    return action.option_strings, action.default, action.type, action.choices, action.required


def test_every_command_takes_the_shared_flags_with_the_same_defaults():
    shared = {command: {dest: signature(options(parser_for(command))[dest]) for dest in SHARED} for command in ADDERS}
    assert shared["transcribe"] == shared["evaluate"] == shared["serve"]


def test_the_torch_free_mirrors_of_library_defaults_equal_the_library_s_values():
    # --help shows these without importing torch; a default moved in the library must move in the help too.
    mirrored = (cli_options.DEFAULT_MAX_NEW_TOKENS, cli_options.DEFAULT_NUM_BEAMS,
                cli_options.JOINT_CTC_LLM_CANDIDATES, cli_options.JOINT_CTC_HEAD_CANDIDATES)
    assert mirrored == (DEFAULT_GENERATION["max_new_tokens"], DEFAULT_GENERATION["num_beams"], LLM_CANDIDATES,
                        HEAD_CANDIDATES)


def test_batch_size_is_shared_by_the_commands_that_take_it():
    # The server batches dynamically (--max-batch-size), so it has no --batch-size.
    transcribe, evaluate = (options(parser_for(command))["batch_size"] for command in ("transcribe", "evaluate"))
    assert signature(transcribe) == signature(evaluate) == (["--batch-size"], 8, int, None, False)


@pytest.mark.parametrize("command", ["transcribe", "evaluate"])
@pytest.mark.parametrize("rate", ["0", "-2", "nan", "inf", "fast"])
def test_a_token_rate_that_is_not_a_positive_number_is_refused_by_name(command, rate, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser_for(command).parse_args(["in.wav" if command == "transcribe" else "m.jsonl", "--model", "m",
                                        "--tokens-per-second", rate])  # fmt: skip
    assert exit_info.value.code == 2
    assert f"argument --tokens-per-second: expected a number > 0, got '{rate}'" in capsys.readouterr().err


def test_the_token_rate_is_shared_by_transcribe_and_evaluate():
    rates = [options(parser_for(command))["tokens_per_second"] for command in ("transcribe", "evaluate")]
    assert [rate.default for rate in rates] == [None, None] and parser_for("evaluate").parse_args(
        ["m.jsonl", "--model", "m", "--tokens-per-second", "5"]).tokens_per_second == 5.0


@pytest.mark.parametrize("command", ADDERS)
def test_every_flag_shows_its_default_in_help(command):
    parser = parser_for(command)
    formatter = DefaultsHelpFormatter(parser.prog)
    silent = [action.option_strings[0] for action in options(parser).values()
              if not action.required and "default" not in formatter._get_help_string(action)]  # fmt: skip
    assert silent == []


@pytest.mark.parametrize("command", ADDERS)
def test_flags_are_spelled_with_dashes(command):
    spelled = [flag for action in options(parser_for(command)).values() for flag in action.option_strings]
    assert [flag for flag in spelled if "_" in flag or "." in flag] == []


def _fresh(code: str) -> dict:
    """What a fresh interpreter running `code` prints as JSON."""
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("argv", [["--help"], ["transcribe", "--help"], ["train", "--help"], ["convert", "--help"]])
def test_the_speechlm_command_builds_its_parsers_without_torch(argv):
    """The console script's entry (`speechlm_cli:main`) defers the Auto-class registration that imports torch."""
    found = _fresh(f"""
import contextlib, io, json, os, sys
import speechlm_cli
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    speechlm_cli.main({argv!r})
print(json.dumps({{"torch": "torch" in sys.modules, "env": os.environ.get("SPEECHLM_DEFER_REGISTRATION")}}))
""")
    assert found == {"torch": False, "env": None}  # and the deferral does not leak into child processes


def test_import_speechlm_still_registers_the_auto_classes():
    found = _fresh("""
import json
import speechlm
from transformers import AutoConfig, AutoModel, AutoModelForMultimodalLM, AutoProcessor
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
config = AutoConfig.for_model("speechlm")
print(json.dumps([type(config).__name__, AutoModel._model_mapping[type(config)].__name__,
                  AutoModelForMultimodalLM._model_mapping[type(config)].__name__,
                  PROCESSOR_MAPPING[type(config)].__name__]))
""")
    assert found == ["SpeechLMConfig", "SpeechLMModel", "SpeechLMModel", "SpeechLMProcessor"]


def test_the_transcribe_parser_loads_no_decoding_code():
    code = """
import contextlib, io, json, sys
import speechlm.cli
before = set(sys.modules)
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    speechlm.cli.main(["transcribe", "--help"])
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = ("torch", "silero_vad", "speechlm.modeling", "speechlm.inference.decoding", "speechlm.inference.segment")
    assert [name for name in loaded if name.startswith(heavy)] == []
    assert "speechlm.inference.cli" in loaded


# ------------------------------------------------------------------------------------------------ binding
@pytest.fixture(scope="module")
def lora_model_dir(build, tmp_path_factory):
    return save_lora_model(build, tmp_path_factory.mktemp("lora-model"))


@pytest.fixture
def spy(monkeypatch):
    """Records the options every CLI load passes to `load_pretrained`, and still loads."""
    calls = []
    real = speechlm.loading.load_pretrained

    def record(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(speechlm.loading, "load_pretrained", record)
    return calls


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "a.wav"
    sf.write(path, make_clips((0.7,))[0], 16000, subtype="FLOAT")
    return path


def test_transcribe_passes_quantize_and_dtype(lora_model_dir, clip, spy):
    assert main(["transcribe", str(clip), "--model", str(lora_model_dir), "--quantize", "int8", "--max-new-tokens", "3",
                 "--quiet"]) == 0  # fmt: skip
    assert spy == [{"dtype": "auto", "device": "cpu", "quantize": "int8", "merge_lora": True}]


def test_evaluate_passes_quantize_and_dtype(lora_model_dir, clip, spy, tmp_path):
    manifest = tmp_path / "dev.jsonl"
    manifest.write_text(json.dumps({"audio": str(clip), "text": "hello"}) + "\n")
    assert main(["evaluate", str(manifest), "--model", str(lora_model_dir), "--dtype", "float32", "--max-new-tokens",
                 "3", "--quiet"]) == 0  # fmt: skip
    assert spy == [{"dtype": "float32", "device": "cpu", "quantize": "none", "merge_lora": True}]


def test_a_bad_load_combination_is_exit_code_2_with_the_reason(lora_model_dir, clip, capsys):
    code = main(["transcribe", str(clip), "--model", str(lora_model_dir), "--quantize", "int8", "--dtype", "bfloat16",
                 "--quiet"])  # fmt: skip
    assert code == 2 and "quantises float32 weights" in capsys.readouterr().err


def test_serve_options_reach_the_model(lora_model_dir):
    args = parser_for("serve").parse_args(["--model", str(lora_model_dir), "--quantize", "int8", "--dtype", "auto"])
    _, model = load_for_inference(args, "cpu")
    assert quantized_linears(model) > 0 and model.config.lora is None


def test_decoding_commands_default_to_the_machines_dtype_without_quantisation():
    for command in ("transcribe", "evaluate", "serve"):
        required = ["--model", "folder"] + (["input.wav"] if command == "transcribe" else [])
        required += ["dev.jsonl"] if command == "evaluate" else []
        args = parser_for(command).parse_args(required)
        assert (args.dtype, args.quantize) == ("auto", "none")


def test_serve_refuses_an_unknown_quantisation():
    with pytest.raises(SystemExit):
        parser_for("serve").parse_args(["--model", "folder", "--quantize", "int4"])


@pytest.mark.parametrize("command", ADDERS)
def test_decoding_flags_defer_to_the_generation_config(command):
    """Unset decoding flags are None: the model's generation_config.json decides, and --help says so."""
    flags = options(parser_for(command))
    for dest, fallback in (("max_new_tokens", "else 128"), ("num_beams", "else 1, greedy")):
        assert flags[dest].default is None
        assert f"from the model's generation_config.json, {fallback}" in flags[dest].help
