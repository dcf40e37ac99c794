"""Joint CTC/LLM decoding: the CTC head's prefix scores steer the LLM's choice of each next token.

The LLM writes fluent text but, on audio it half-hears, a plausible sentence of its training domain instead of what
was said; the CTC head (`speechlm.alignment`) reads the projected audio tokens frame by frame and cannot invent a
sentence. On the demo's real phone speech the head alone read 33.8 % WER where the LLM wrote 58.1 % (same model).
Joint decoding, as in hybrid CTC/attention recognisers (Watanabe et al. 2017, ESPnet), scores each candidate token
by `(1 - w) * log p_LLM + w * (log p_CTC(prefix + token) - log p_CTC(prefix))`, where `p_CTC(prefix)` is the
probability that the audio begins with `prefix` and, for end-of-sequence, that it holds exactly `prefix`. Summed over
the steps the CTC terms are the whole answer's CTC prefix score, so greedy and beam search both work.

Only the LLM's `candidates` best tokens per step are scored (the prefix recursion is linear in audio tokens), plus,
with `head_candidates`, the head's own best next tokens: the LLM alone proposes only words of its training domain, so
on open-domain speech the head could only choose among wrong words. The head's proposals cost one pass over the audio
tokens for every class at once, because a prefix score needs only the prefix's state (the recursion's new states are
computed for the chosen candidates alone). Tokens the head has no class for (outside its `vocabulary_ids`) cannot be
written. With a `span`, the head scores only part of the answer, e.g. the `"transcript"` field of a JSON answer that
goes on with an intent and slots (`json_string_span`): there a closing quote plays end-of-sequence's part, and outside
the LLM decides alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from transformers import LogitsProcessor

NEG_INF = float("-inf")
# Candidate next tokens scored per step: the LLM's best, and the head's own best beside them
# (`generate(joint_ctc_head_candidates=...)`). The head's 8 took a 20-minute demo model from 94.7 to 88.8 % WER on the
# UQM development split and helped every held-out set (README, benchmarks/joint_ctc.py); 16 changed nothing more.
LLM_CANDIDATES = 8
HEAD_CANDIDATES = 8
PROPOSAL_ELEMENTS = 1 << 24  # the head's proposals are scored this many (row, audio token, class) values at a time


class CTCPrefixScorer(LogitsProcessor):
    """A `LogitsProcessor` for `generate` over inputs whose `input_ids` hold only the generated tokens.

    `log_probs`: (B, A, 1 + classes) CTC log-probabilities of each clip's audio tokens (blank = class 0), `lengths`:
    (B,) audio tokens per clip, `vocabulary_ids`: the LLM token id of each class (None: class c is token c - 1).
    Rows of a beam search (B * beams) are matched to their prefix's state by content, so beam reordering is safe.
    `span` = (opening token ids, closing token ids): the head scores only the tokens after the opening sequence, up
    to the first closing token, which then scores as the end of the clip does. `candidates`: the LLM's best tokens
    scored per step; `head_candidates`: the head's best next tokens scored beside them.
    """

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, weight: float, eos_token_id: int | list[int],
                 vocabulary_ids: torch.Tensor | None = None, candidates: int = LLM_CANDIDATES,
                 span: tuple[Sequence[int], Collection[int]] | None = None, head_candidates: int = HEAD_CANDIDATES):
        if not 0 < weight <= 1:
            raise ValueError(f"the CTC weight must be in (0, 1], got {weight}")
        if candidates < 1 or head_candidates < 0:
            raise ValueError(f"candidates must be >= 1 and head_candidates >= 0, got {candidates} and "
                             f"{head_candidates}")
        # On the CPU whatever the model's device: the recursion is a few small ops per audio token, which a GPU would
        # run as many tiny kernels with a sync each.
        self.log_probs = log_probs.detach().float().cpu()
        self.lengths = lengths.detach().long().cpu()
        self.weight = float(weight)
        self.eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]).view(-1)
        self.eos_ids = set(self.eos.tolist())
        self.opening = tuple(span[0]) if span is not None else None
        self.closing = set(span[1]) if span is not None else set()
        self.ends = torch.tensor(sorted(self.closing)) if span is not None else self.eos
        self.candidates = int(candidates)
        self.head_candidates = int(head_candidates)
        size = log_probs.shape[-1] - 1
        ids = vocabulary_ids.long().cpu() if vocabulary_ids is not None else torch.arange(size)
        self.class_of = {int(token): c + 1 for c, token in enumerate(ids.tolist())}
        self.token_of = ids
        self.states: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def _empty_state(self, clip: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        blank = self.log_probs[clip, :, 0]
        length = int(self.lengths[clip])
        r_b = torch.cumsum(blank, 0)
        r_b[length:] = r_b[length - 1] if length else NEG_INF
        return torch.full_like(blank, NEG_INF), r_b, 0.0

    def _extend(self, clips: torch.Tensor, r_n: torch.Tensor, r_b: torch.Tensor, last: torch.Tensor,
                classes: torch.Tensor):
        """States (r_n, r_b: (R, A, K)) and prefix scores (R, K) of R prefixes, each extended by each of its `classes`.

        `clips`: (R,) each prefix's clip, `r_n`/`r_b`: (R, A) their states, `last`: (R,) the class of their last token
        (-1: empty prefix), `classes`: (R, K). One pass over the audio tokens serves every row of the batch.
        """
        x = self.log_probs[clips]  # (R, A, C)
        lengths = self.lengths[clips]
        rows, width, k = x.shape[0], x.shape[1], classes.shape[1]
        x_c = x.gather(2, classes[:, None, :].expand(-1, width, -1))  # (R, A, K)
        blank = x[:, :, 0, None]
        # A repeated label needs a blank between the two.
        phi = torch.where((classes == last[:, None])[:, None, :], r_b[:, :, None],
                          torch.logaddexp(r_n, r_b)[:, :, None].expand(-1, -1, k))
        new_n = torch.full((rows, width, k), NEG_INF)
        new_b = torch.full((rows, width, k), NEG_INF)
        empty = last < 0
        new_n[empty, 0] = x_c[empty, 0]
        psi = new_n[:, 0].clone()
        for t in range(1, int(lengths.max())):
            new_n[:, t] = torch.logaddexp(new_n[:, t - 1], phi[:, t - 1]) + x_c[:, t]
            new_b[:, t] = torch.logaddexp(new_n[:, t - 1], new_b[:, t - 1]) + blank[:, t]
            psi = torch.where((t < lengths)[:, None], torch.logaddexp(psi, phi[:, t - 1] + x_c[:, t]), psi)
        # Past its clip's end a row keeps its last state (padding audio tokens are never read).
        steps = torch.arange(width)
        held = torch.where(steps < lengths[:, None], steps, (lengths[:, None] - 1).clamp(min=0))
        held = torch.where(lengths[:, None] > 0, held, steps)[:, :, None].expand(-1, -1, k)
        return new_n.gather(1, held), new_b.gather(1, held), psi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, clips = input_ids.shape[0], self.log_probs.shape[0]
        beams = rows // clips
        llm = scores.float().log_softmax(-1).cpu()
        combined = llm.clone()  # finished rows, and rows with a token the head could not score: the LLM alone
        top = llm.topk(min(self.candidates, llm.shape[-1]), dim=-1).indices
        active, states, token_lists = [], [], []
        for row in range(rows):
            clip, ids = row // beams, tuple(input_ids[row].tolist())
            if ids and ids[-1] in self.eos_ids:  # finished: leave it as it is
                continue
            if (prefix := self._scored_part(ids)) is None:
                continue
            state = self.states.get((clip, prefix)) if prefix else self._empty_state(clip)
            if state is None or state[2] == NEG_INF:
                # A token the head could not score, or more labels than the clip has audio tokens, was forced in
                # (a beam search keeps such rows when it has too few others): the LLM alone from here.
                continue
            active.append((row, clip, prefix))
            states.append(state)
            token_lists.append([t for t in top[row].tolist() if t in self.class_of])
        fresh: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}
        if active:
            # The active rows' prefix states, stacked once for the head's proposals and the scoring.
            clips = torch.tensor([clip for _, clip, _ in active])
            r_n, r_b = torch.stack([state[0] for state in states]), torch.stack([state[1] for state in states])
            last = torch.tensor([self.class_of.get(prefix[-1], -1) if prefix else -1 for _, _, prefix in active])
            if self.head_candidates:
                proposals = self.proposals(clips, r_n, r_b, last)
                token_lists = [list(dict.fromkeys(tokens + extra)) for tokens, extra in zip(token_lists, proposals)]
            psi_prefix = torch.tensor([state[2] for state in states])
            self._score(active, token_lists, (clips, r_n, r_b, last, psi_prefix), llm, combined, fresh)
        self.states = fresh
        return combined.to(device=scores.device, dtype=scores.dtype)

    def _scored_part(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """The tokens the head scores: all of them, or with a span those after its opening (None before it opens and
        once it has closed)."""
        if self.opening is None:
            return ids
        size = len(self.opening)
        for start in range(len(ids) - size + 1):
            if ids[start : start + size] == self.opening:
                part = ids[start + size :]
                return None if any(token in self.closing for token in part) else part
        return None

    def prefix_scores(self, clips: torch.Tensor, r_n: torch.Tensor, r_b: torch.Tensor, last: torch.Tensor
                      ) -> torch.Tensor:
        """(R, 1 + classes) log-probability that each clip's audio begins with its prefix followed by each class (the
        `psi` that `_extend` computes for chosen classes), for every class at once; the blank column is meaningless.

        Emitting class c first at audio token t needs the prefix complete by t - 1 (`phi`, its last label repeated
        only across a blank), so the score is a log-sum over t of phi(t - 1) + log p_t(c): one (A, classes) pass.
        """
        x = self.log_probs[clips]  # (R, A, C)
        lengths = self.lengths[clips]
        empty = last < 0
        start = torch.where(empty, 0.0, NEG_INF)[:, None]  # before the first audio token: only the empty prefix
        phi = torch.cat([start, torch.logaddexp(r_n, r_b)[:, :-1]], dim=1)  # (R, A): complete by t - 1
        phi_repeat = torch.cat([start, r_b[:, :-1]], dim=1)
        inside = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        phi = phi.masked_fill(~inside, NEG_INF)
        scores = torch.logsumexp(phi[:, :, None] + x, dim=1)
        repeat = ~empty
        if repeat.any():
            rows = repeat.nonzero()[:, 0]
            column = x[rows, :, last[rows]]  # (r, A)
            scores[rows, last[rows]] = torch.logsumexp(phi_repeat[rows].masked_fill(~inside[rows], NEG_INF) + column,
                                                       dim=1)
        return scores

    def proposals(self, clips: torch.Tensor, r_n: torch.Tensor, r_b: torch.Tensor, last: torch.Tensor
                  ) -> list[list[int]]:
        """The head's `head_candidates` best next tokens for each prefix (by prefix score); arguments as in
        `prefix_scores`."""
        # A few rows at a time: a head over a whole vocabulary (49k classes) x a 30-second clip is ~70 MB per row.
        chunk = max(1, PROPOSAL_ELEMENTS // (self.log_probs.shape[1] * self.log_probs.shape[2]))
        proposals = []
        for start in range(0, len(clips), chunk):
            rows = slice(start, start + chunk)
            scores = self.prefix_scores(clips[rows], r_n[rows], r_b[rows], last[rows])[:, 1:]
            best = scores.topk(min(self.head_candidates, scores.shape[1]), dim=1)
            proposals += [self.token_of[indices[values > NEG_INF]].tolist() for values, indices in zip(*best)]
        return proposals

    def _score(self, active, token_lists, prefixes, llm, combined, fresh) -> None:
        """Writes the joint scores of the active rows' candidates and of end-of-sequence into `combined`;
        `prefixes`: their stacked states (clips, r_n, r_b, last class, prefix score)."""
        clips, r_n, r_b, last, psi_prefix = prefixes
        width = max(1, max(len(tokens) for tokens in token_lists))
        # Rows with fewer candidates are padded with the blank class; their padding is scored and thrown away.
        classes = torch.zeros(len(active), width, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            classes[i, : len(tokens)] = torch.tensor([self.class_of[t] for t in tokens], dtype=torch.long)
        new_n, new_b, psi = self._extend(clips, r_n, r_b, last, classes)
        lengths = self.lengths[clips]
        end_index = (lengths - 1).clamp(min=0)[:, None]
        end = torch.logaddexp(r_n.gather(1, end_index), r_b.gather(1, end_index))[:, 0]
        end = torch.where(lengths > 0, end, torch.zeros_like(end))
        w = self.weight
        for i, ((row, clip, prefix), tokens) in enumerate(zip(active, token_lists)):
            combined[row] = NEG_INF
            for k, token in enumerate(tokens):
                fresh[(clip, (*prefix, token))] = (new_n[i, :, k], new_b[i, :, k], float(psi[i, k]))
            if tokens:
                index = torch.tensor(tokens)
                combined[row, index] = (1 - w) * llm[row, index] + w * (psi[i, : len(tokens)] - psi_prefix[i])
            combined[row, self.ends] = (1 - w) * llm[row, self.ends] + w * (end[i] - psi_prefix[i])


def json_string_span(tokenizer, opening: str = '{"transcript": "') -> tuple[list[int], list[int]]:
    """The `span` of a JSON answer's string field that opens the answer with `opening`: its tokens, and every token
    holding a double quote (what can close the string)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    closing = [i for i, token in enumerate(tokens) if token is not None and '"' in token]
    return tokenizer.encode(opening, add_special_tokens=False), closing


def transcript_opening(schema: dict | None) -> str | None:
    """The text every answer held to `schema` opens with, up to its transcript's first character, when every object
    the schema allows (itself, or each of its `anyOf`/`oneOf`) has a string `transcript` as its first property (with
    the key separator of its `x-guidance`). None otherwise: the head reads the words said, and any other answer would
    only be pulled towards them."""
    from .inference.structured import defined

    if not isinstance(schema, dict):
        return None
    for option in schema.get("anyOf") or schema.get("oneOf") or [schema]:
        properties = option.get("properties") if isinstance(option, dict) else None
        first = next(iter(properties), None) if isinstance(properties, dict) else None
        field = defined(schema, properties[first]) if first == "transcript" else None
        if not isinstance(field, dict) or field.get("type") != "string":
            return None
    return '{"transcript"' + (schema.get("x-guidance") or {}).get("key_separator", ": ") + '"'


def schema_transcript_span(tokenizer, schema: dict | None) -> tuple[list[int], list[int]] | None:
    """The `span` of the transcript that answers held to `schema` open with (`transcript_opening`); None when they
    do not open with one."""
    opening = transcript_opening(schema)
    return None if opening is None else json_string_span(tokenizer, opening)


def joint_options(tokenizer, weight: float | None, transcript: bool, schema: dict | None = None) -> dict:
    """`generate` options for joint CTC decoding at `weight`: the whole answer when it is a `transcript`, else only
    the transcript field that answers held to `schema` open with (`schema_transcript_span`); none otherwise, or
    without a weight."""
    if not weight:
        return {}
    if transcript:
        return {"joint_ctc_weight": weight}
    span = schema_transcript_span(tokenizer, schema)
    return {"joint_ctc_weight": weight, "joint_ctc_span": span} if span else {}


__all__ = ["HEAD_CANDIDATES", "LLM_CANDIDATES", "CTCPrefixScorer", "joint_options", "json_string_span",
           "schema_transcript_span", "transcript_opening"]
