"""Structured outputs: answers that follow a JSON schema, enforced token by token while decoding.

A speech LLM asked for "intent and slots as JSON" will, when it half-hears a clip, invent an intent name the
application does not have. Given the application's schema (its intents as an `enum`, its slots as properties) the
decoder can only say what the schema allows, and the model's own probabilities choose among those answers. The
grammar engine is llguidance (the one behind OpenAI-style structured outputs in several serving engines); this
module only adapts it to `generate` as a `LogitsProcessor`.

Used by `transcribe_arrays(..., json_schema=...)`, the server's `response_format` and the demo's SLU evaluation. A
short free-text answer can be held to a regular expression the same way (`regex=...`, e.g. a time or a digit string).

A schema whose answers begin with a transcript may also say that every other string is quoted from it
(`"x-speechlm-words-from": "transcript"`): once the transcript field is written, each slot value is held to runs of
its words (and to the slot's own enum or pattern), so the LLM cannot fill a slot with a word nobody said.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# OpenAI's `response_format: {"type": "json_object"}`: any JSON object.
JSON_OBJECT_SCHEMA: dict = {"type": "object"}
# The schema keyword naming the (first) string field whose words the other string fields must quote.
WORDS_FROM = "x-speechlm-words-from"


def schema_grammar(schema: dict | str) -> str:
    """llguidance's grammar for a JSON schema (a dict or its JSON text); a `ValueError` that says what is wrong with
    an invalid one."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"json_schema is not valid JSON: {error}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    if isinstance(schema, dict) and WORDS_FROM in schema:
        _check_words_from(schema)
    return _checked_grammar("json_schema", json.dumps(schema))


def _check_words_from(schema: dict) -> None:
    """A `WORDS_FROM` field must open every object the schema allows, as a string: answers are quoted from it only
    once it is written, so a field written later would quietly hold nothing."""
    field = schema[WORDS_FROM]
    for frame in schema.get("anyOf", [schema]):
        first = next(iter(frame.get("properties", {}).items()), (None, {}))
        if first[0] != field or defined(schema, first[1]).get("type") != "string" \
                or field not in frame.get("required", []):
            raise ValueError(f"json_schema: {WORDS_FROM} names {field!r}, which must be the first property, a "
                             "required string, of every object the schema allows")


def defined(schema: dict, node: dict) -> dict:
    """`node`, or the definition in `schema` that its local reference (`{"$ref": "#/$defs/NAME"}`) names: a large
    field every frame shares (a transcript held to a long pattern) is defined once, which llguidance builds once."""
    reference = node.get("$ref") if isinstance(node, dict) else None
    if isinstance(reference, str) and reference.startswith("#/$defs/"):
        return schema.get("$defs", {}).get(reference.removeprefix("#/$defs/"), {})
    return node


def _referenced_definitions_only(schema: dict) -> dict:
    """`schema` without the `$defs` entries nothing refers to any more (a quoted transcript is a `const`: the long
    definition it referred to would otherwise be rebuilt in every per-transcript grammar)."""
    definitions = schema.get("$defs")
    if not definitions:
        return schema
    rest = {key: value for key, value in schema.items() if key != "$defs"}
    kept, text = {}, json.dumps(rest)
    while new := {name: value for name, value in definitions.items()
                  if name not in kept and f'"#/$defs/{name}"' in text}:
        kept.update(new)
        text = json.dumps(list(new.values()))
    return {**rest, "$defs": kept} if kept else rest


def read_schema_file(path: str | Path) -> dict:
    """A JSON schema read from a file and checked (commands do this before loading a model); a `ValueError` naming
    the file says what is wrong."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
        schema_grammar(schema)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    return schema


def regex_grammar(pattern: str) -> str:
    """llguidance's grammar for answers that match `pattern` as a whole (Python-style syntax, no lookarounds or
    backreferences); a `ValueError` for one it cannot use."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"regex must be a non-empty string, got {pattern!r}")
    return _checked_grammar("regex", pattern)


@functools.lru_cache(maxsize=64)
def _checked_grammar(kind: str, source: str) -> str:
    """Built and checked once per distinct schema (JSON text) or regex (a large schema takes ~0.5 s): every batch and
    request reuses it."""
    from llguidance import LLMatcher

    is_schema = kind == "json_schema"
    grammar = (LLMatcher.grammar_from_json_schema if is_schema else LLMatcher.grammar_from_regex)(source)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"{kind if is_schema else f'regex {source!r}'} is not usable: {messages[0][:300]}")
    return grammar


def structure_grammar(generate_kwargs: dict) -> str | None:
    """The grammar that a `json_schema` or a `regex` option asks for (None: free text); checked, so a bad option
    fails before any work is done."""
    schema, pattern = generate_kwargs.get("json_schema"), generate_kwargs.get("regex")
    if schema is not None and pattern is not None:
        raise ValueError("give json_schema or regex, not both")
    if schema is not None:
        return schema_grammar(schema)
    return None if pattern is None else regex_grammar(pattern)


def _engine_tokenizer(tokenizer, vocab_size: int, eos: list[int]):
    """llguidance's view of a Hugging Face fast tokenizer (about a second to build): kept on the tokenizer."""
    import llguidance.hf

    key = (vocab_size, tuple(eos))
    cache = tokenizer.__dict__.setdefault("_speechlm_llguidance", {})
    if key not in cache:
        cache[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    return cache[key]


class JsonSchemaLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the grammar's language (a JSON schema's, or a regex's: any llguidance
    grammar); one grammar state per distinct generated prefix,
    so beam search (rows reordered between steps) and batches of different answers are both handled.

    Stateful: use one instance per `generate` call (`with_json_schema` makes one per call). The end token is
    allowed only where the JSON may end, and once it is complete nothing else is.
    """

    def __init__(self, tokenizer, grammar: str, eos_token_id: int | list[int] | None):
        self.tokenizer, self.grammar = tokenizer, grammar
        ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        self.eos_token_ids = [int(i) for i in ids if i is not None]
        self.prompt_length: int | None = None
        self.states: dict[tuple, Any] = {}

    def _state(self, prefix: tuple, vocab_size: int):
        from llguidance import LLMatcher

        if prefix in self.states:
            return self.states[prefix]
        if not prefix:
            return LLMatcher(_engine_tokenizer(self.tokenizer, vocab_size, self.eos_token_ids or None), self.grammar)
        parent = self.states.get(prefix[:-1])
        if parent is None or parent.is_stopped() or parent.is_error():
            return None
        state = parent.deep_copy()
        state.consume_token(prefix[-1])
        return state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        if self.prompt_length is None:  # the first call sees the prompt (or nothing, when generating from embeddings)
            self.prompt_length = input_ids.shape[1]
        vocab_size = scores.shape[-1]
        states, rows, complete = {}, [], []
        bitmask = allocate_token_bitmask(input_ids.shape[0], vocab_size)
        for row, ids in enumerate(input_ids[:, self.prompt_length :].tolist()):
            prefix = tuple(ids)
            state = states[prefix] = states.get(prefix) or self._state(prefix, vocab_size)
            if state is None or state.is_error():
                continue
            if state.is_stopped():  # the answer is complete: only the end token may follow
                complete.append(row)
            else:
                fill_next_token_bitmask(state, bitmask, row)
                rows.append(row)
        self.states = states
        if rows:
            bits = torch.arange(32, dtype=torch.int32)
            allowed = ((bitmask[rows].unsqueeze(-1) >> bits) & 1).flatten(1)[:, :vocab_size].bool().to(scores.device)
            masked = scores[rows].masked_fill(~allowed, float("-inf"))
            # An earlier processor (n-gram ban, bad words) may have ruled out every token the schema allows: choose
            # among those alike rather than produce NaN or leave the schema.
            dead = ~torch.isfinite(masked).any(-1, keepdim=True)
            scores[rows] = torch.where(dead & allowed, torch.zeros_like(masked), masked)
        if complete and self.eos_token_ids:
            ended = torch.full_like(scores[complete], float("-inf"))
            ended[:, self.eos_token_ids] = 0.0
            scores[complete] = ended
        return scores


def word_runs(text: str) -> list[str]:
    """Every run of consecutive whole words of `text`, each once, shortest first."""
    words = text.split()
    runs = (" ".join(words[i : i + n]) for n in range(1, len(words) + 1) for i in range(len(words) - n + 1))
    return list(dict.fromkeys(runs))


@functools.lru_cache(maxsize=4096)
def _fits(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def _quoted(field_schema: dict, runs: list[str]) -> dict:
    """A string field held to the runs it may take (its own enum, const or pattern still holds); a field no run fits
    keeps its own schema: the transcript may have misheard the very word, and taking the frame away instead would
    move the answer to another intent."""
    if field_schema.get("type") != "string":
        return field_schema
    allowed = field_schema.get("enum", [field_schema["const"]] if "const" in field_schema else None)
    pattern = field_schema.get("pattern")
    fitting = [run for run in runs if (allowed is None or run in allowed) and (pattern is None or _fits(pattern, run))]
    return {"type": "string", "enum": fitting} if fitting else field_schema


# A field's schema at least this long (JSON characters) that several frames share is built once (`shared_fields`).
SHARED_FIELD_CHARS = 1000


def shared_fields(schema: dict) -> dict:
    """`schema` with every long field schema that several frames repeat defined once in `$defs` and referred to: the
    same language, but llguidance builds a definition once where it builds each inline copy anew (the demo's SLU
    frames repeat an amount pattern five times; its grammar for one transcript builds 3.5x faster)."""
    frames = schema.get("anyOf", [schema])
    seen: dict[str, int] = {}
    for frame in frames:
        for value in frame.get("properties", {}).values():
            if len(text := json.dumps(value, sort_keys=True)) >= SHARED_FIELD_CHARS:
                seen[text] = seen.get(text, 0) + 1
    repeated = [text for text, count in seen.items() if count > 1]
    if not repeated:
        return schema
    definitions = dict(schema.get("$defs", {}))
    names = {}
    for text in repeated:
        names[text] = next(f"shared_{n}" for n in range(len(definitions) + 1) if f"shared_{n}" not in definitions)
        definitions[names[text]] = json.loads(text)

    def refer(frame: dict) -> dict:
        properties = {key: {"$ref": f"#/$defs/{names[text]}"} if (text := json.dumps(value, sort_keys=True)) in names
                      else value for key, value in frame.get("properties", {}).items()}
        return {**frame, "properties": properties}

    rest = {**schema, "anyOf": [refer(frame) for frame in frames]} if "anyOf" in schema else refer(schema)
    return {**rest, "$defs": definitions}


def quoted_schema(schema: dict, text: str) -> dict:
    """`schema` once its `WORDS_FROM` field reads `text`: that field fixed, every other string field held to the runs
    of its words it may take (`_quoted`), in every `anyOf` frame; the keyword itself is spent. The fields no run fits
    keep their own schemas, the same in many frames: each is defined once (`shared_fields`)."""
    field, runs = schema[WORDS_FROM], word_runs(text)

    def narrow(frame: dict) -> dict:
        properties = {key: {"const": text} if key == field else _quoted(defined(schema, value), runs)
                      for key, value in frame.get("properties", {}).items()}
        return {**frame, "properties": properties}

    rest = {key: value for key, value in schema.items() if key != WORDS_FROM}  # quoted now
    narrowed = {**rest, "anyOf": [narrow(frame) for frame in schema["anyOf"]]} if "anyOf" in schema else narrow(rest)
    return shared_fields(_referenced_definitions_only(narrowed))


class QuotingJsonLogitsProcessor(JsonSchemaLogitsProcessor):
    """A `JsonSchemaLogitsProcessor` for a schema with `WORDS_FROM`: a row whose answer has just closed that
    (first) field switches to `quoted_schema(schema, what it wrote)`, replayed over the tokens so far; beams that
    wrote different transcripts get different grammars, built once per transcript text in a `generate` call and not
    validated again (the schema they narrow was; a matcher in error falls back to the schema's own state)."""

    def __init__(self, tokenizer, schema: dict, eos_token_id: int | list[int] | None):
        super().__init__(tokenizer, schema_grammar(schema), eos_token_id)
        self.schema = schema
        self.quoting: dict[str, Any] = {}  # transcript text -> its grammar's matcher, before any token
        self.opening = re.compile(r'\s*\{\s*"' + re.escape(schema[WORDS_FROM]) + r'"\s*:\s*"((?:[^"\\]|\\.)*)"')

    def _written(self, prefix: tuple) -> str | None:
        """The words-from field's text once the answer has closed it, else None."""
        found = self.opening.match(self.tokenizer.decode(list(prefix)))
        return None if found is None else json.loads(f'"{found.group(1)}"')

    def _state(self, prefix: tuple, vocab_size: int):
        from llguidance import LLMatcher

        state = super()._state(prefix, vocab_size)
        if state is None or prefix in self.states or (text := self._written(prefix)) is None \
                or self._written(prefix[:-1]) is not None:  # not the step that closed the field
            return state
        if text not in self.quoting:
            grammar = LLMatcher.grammar_from_json_schema(json.dumps(quoted_schema(self.schema, text)))
            self.quoting[text] = LLMatcher(_engine_tokenizer(self.tokenizer, vocab_size, self.eos_token_ids or None),
                                           grammar)  # fmt: skip
        quoting = self.quoting[text].deep_copy()
        return quoting if quoting.consume_tokens(list(prefix)) and not quoting.is_error() else state


def schema_of(generate_kwargs: dict) -> dict | None:
    """The `json_schema` option of `generate` options as a dict (it may come as JSON text); None without one."""
    schema = generate_kwargs.get("json_schema")
    return json.loads(schema) if isinstance(schema, str) else schema


def with_json_schema(generate_kwargs: dict, model, tokenizer) -> dict:
    """`generate` options with a `json_schema` option (a schema dict or its JSON text) or a `regex` option swapped
    for a fresh `JsonSchemaLogitsProcessor`; other options are passed through."""
    grammar = structure_grammar(generate_kwargs)
    kwargs = {k: v for k, v in generate_kwargs.items() if k not in ("json_schema", "regex")}
    if grammar is None:
        return kwargs
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)  # a chat may end at its end-of-turn
    eos = tokenizer.eos_token_id if eos is None else eos
    processors = LogitsProcessorList(kwargs.get("logits_processor") or [])
    schema = schema_of(generate_kwargs)
    if quoting(schema):
        processors.append(QuotingJsonLogitsProcessor(tokenizer, schema, eos))
    else:
        processors.append(JsonSchemaLogitsProcessor(tokenizer, grammar, eos))
    kwargs["logits_processor"] = processors
    return kwargs


def quoting(schema) -> bool:
    """Whether a schema quotes its values from a transcript field (`WORDS_FROM`)."""
    return isinstance(schema, dict) and WORDS_FROM in schema


def quoted_throughout(schema: dict, text: str) -> bool:
    """Whether `text`, an answer to a `WORDS_FROM` schema, quotes every string it wrote after that field from the
    field's words (constants such as an intent name aside). The quoting falls back to a slot's own values where no
    run of the words fits, and a frame that needed that fallback is most often the wrong frame: on two demo models
    the intent of a fully quoted frame was right 149 of 153 and 150 of 152 times, of one with a value from
    elsewhere 16 of 47 and 30 of 48 times (README)."""
    from ..tasks import parse_json_object

    answer, field = parse_json_object(text), schema[WORDS_FROM]
    if answer is None or not isinstance(answer.get(field), str):
        return False
    runs = set(word_runs(answer[field]))
    constants = {key for frame in schema.get("anyOf", [schema]) for key, value in frame.get("properties", {}).items()
                 if "const" in defined(schema, value)}
    return all(value in runs for key, value in answer.items()
               if key != field and key not in constants and isinstance(value, str))


def first_quoted(schema: dict, candidates: list[str]) -> str:
    """Among one clip's beams (best first, `transcribe_arrays(..., num_return_sequences=k)`), the best that is
    `quoted_throughout`; the best of all when none is."""
    return next((text for text in candidates if quoted_throughout(schema, text)), candidates[0])


__all__ = [
    "JSON_OBJECT_SCHEMA",
    "JsonSchemaLogitsProcessor",
    "QuotingJsonLogitsProcessor",
    "WORDS_FROM",
    "defined",
    "first_quoted",
    "quoted_throughout",
    "quoting",
    "quoted_schema",
    "read_schema_file",
    "regex_grammar",
    "schema_of",
    "shared_fields",
    "schema_grammar",
    "structure_grammar",
    "with_json_schema",
    "word_runs",
]
