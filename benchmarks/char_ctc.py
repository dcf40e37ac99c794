"""A character CTC head beside a trained demo model, and joint decoding with it held to a word list: can the model
write the words its training never said?

A demo model misses 88-100 % of the unseen UQM actors' words that its training says fewer than 10 times (session 54,
`benchmarks/word_frequency.py`): its CTC head and, through joint decoding, its LLM write only tokens heard in training.
A head over letters can spell any word. This screen trains one (`CharCTCHead`: an MLP over each frozen-encoder frame,
50 per second, 26 letters + apostrophe + space + blank) on the demo corpus's cached training frames for a fixed number
of steps, the demo model untouched, then decodes a trained demo model's held-out sets with it in place of the model's
token CTC head (`CharPrefixScorer`): the LLM proposes its best next tokens, the character head proposes the tokens its
best letter paths spell, and each candidate scores `(1 - w) x log p_LLM + w x (gain in the character CTC prefix score
+ bonus x letters added)`. With `--lexicon` (the default) every finished word must be in a word list, Debian's
`wamerican` (`apt-get install wamerican`) plus the training transcripts' words, and an unfinished one the beginning of
one: without it the head's misspellings ("transfordt", "unuts") pass. Tokens that add no letter are refused (the
transcripts have no punctuation). A prototype measured here, not yet a library or demo feature.

    python benchmarks/char_ctc.py train [--steps 4000] [--seed 0]
    python benchmarks/char_ctc.py decode --models RUN/model [...] [--weight 0.5] [--bonus 1] [--no-lexicon]
        [--sets test_uqm ...] [--limit N]
    # decode writes benchmarks/results/char_ctc_decode.md (the analysis of session 60 is char_ctc.md)
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from speechlm.cache import cache_dir
from speechlm.data import EncoderCache, SpeechLMDataset
from speechlm.demo import run as demo
from speechlm.demo.corpus import manifest_records
from speechlm.demo.evaluate import MAX_NEW_TOKENS, TEST_SETS, TOKENS_PER_SECOND
from speechlm.demo.training import training_records
from speechlm.evaluation import word_error_rate
from speechlm.evaluation.normalizers import normalize_text

ROOT = Path(__file__).resolve().parents[1]
CHARS = " abcdefghijklmnopqrstuvwxyz'"
INDEX = {c: i + 1 for i, c in enumerate(CHARS)}  # 0: blank
NEG = float("-inf")
WORD_LIST = Path("/usr/share/dict/american-english")


class CharCTCHead(nn.Module):
    """Letters per encoder frame (50 per second: enough for fast speech's ~15 letters per second with blanks)."""

    def __init__(self, frame_size: int = 384, width: int = 768):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(frame_size), nn.Linear(frame_size, width), nn.GELU(),
                                 nn.Linear(width, width), nn.GELU(), nn.Linear(width, len(CHARS) + 1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames.float())


def letters(text: str) -> str:
    return " ".join(normalize_text(text).split())


def corpus_and_cache():
    """The default demo corpus, its encoder and the frame cache (the corpus's own training frames where a demo run
    encoded them)."""
    settings = demo.DemoSettings(lora_rank=0)
    root, manifests = demo.demo_corpus(settings)
    processor, model = demo.load_parts(settings)
    cache = EncoderCache.for_model(model, processor, dtype=torch.float16)
    for frames in [*sorted(root.glob("train-frames-*.safetensors")), frame_file(cache)]:
        if frames.is_file():
            cache.load(frames)
    return settings, manifests, processor, model, cache


def frame_file(cache: EncoderCache) -> Path:
    return cache_dir("benchmarks", "char_ctc") / f"frames-{cache.fingerprint[:10]}.safetensors"


def frames_of(cache: EncoderCache, model, processor, rows: list[dict]) -> list[torch.Tensor]:
    """Each row's cached frames, encoding (and saving) the missing ones first."""
    missing = [row for row in rows if cache.key(row) not in cache]
    if missing and cache.fill(model, processor, SpeechLMDataset(missing, processor.sampling_rate, encoder_cache=cache),
                              batch_size=16):
        cache.save(frame_file(cache))
    return [cache.get(cache.key(row)) for row in rows]


def head_file(steps: int, seed: int) -> Path:
    return cache_dir("benchmarks", "char_ctc") / f"head-{steps}-{seed}.pt"


def train(args) -> None:
    """`args.steps` batches of 8 clips (the demo's training examples, real clips x3 with augmented copies), AdamW,
    warmup then cosine; the head's greedy WER / CER on each held-out set at the end."""
    settings, manifests, processor, model, cache = corpus_and_cache()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    examples = training_records(manifest_records(manifests["train"]), settings.real_speech_repeats,
                                augment=settings.real_speech_augment)
    frames = frames_of(cache, model, processor, examples)
    targets = [[INDEX[c] for c in letters(example["transcript"]) if c in INDEX] for example in examples]
    head = CharCTCHead(frames[0].shape[-1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.learning_rate, weight_decay=0.01)
    start = time.monotonic()
    for step in range(1, args.steps + 1):
        cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, step / 200) * cosine
        chosen = random.sample(range(len(examples)), args.batch_size)
        lengths = torch.tensor([frames[i].shape[0] for i in chosen])
        batch = torch.zeros(len(chosen), int(lengths.max()), frames[0].shape[-1])
        for row, i in enumerate(chosen):
            batch[row, : lengths[row]] = frames[i].float()
        target_lengths = torch.tensor([len(targets[i]) for i in chosen])
        flat = torch.tensor([c for i in chosen for c in targets[i]])
        log_probs = head(batch).log_softmax(-1).transpose(0, 1)
        loss = nn.functional.ctc_loss(log_probs, flat, lengths, target_lengths, reduction="sum", zero_infinity=True)
        loss = loss / target_lengths.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        if step % 500 == 0:
            print(f"step {step}: character CTC loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    torch.save(head.state_dict(), head_file(args.steps, args.seed))
    head.eval()
    for name in TEST_SETS:
        rows = manifest_records(manifests[name])
        hypotheses = [greedy(head, clip) for clip in frames_of(cache, model, processor, rows)]
        metrics = word_error_rate([row["text"] for row in rows], hypotheses)
        print(f"{name}: character head alone, greedy: WER {metrics['wer']:.1%} CER {metrics['cer']:.1%}", flush=True)


@torch.no_grad()
def greedy(head: CharCTCHead, frames: torch.Tensor) -> str:
    best = head(frames).argmax(-1).tolist()
    kept = [c for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1])]
    return " ".join("".join(CHARS[c - 1] for c in kept).split())


def spelled_tokens(tokenizer) -> dict[str, list[int]]:
    """A token's text (letters and single spaces only, lower-cased) -> its ids: what the letter beam can propose.
    Decodes the whole vocabulary, so it is built once per tokenizer, not per clip."""
    tokens_of: dict[str, list[int]] = {}
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token]).lower()
        if text.strip() and all(c in INDEX for c in text) and "  " not in text and not text.endswith(" "):
            tokens_of.setdefault(text, []).append(token)
    return tokens_of


class CharPrefixScorer(LogitsProcessor):
    """Joint decoding of one clip (any number of beams) with a character CTC head: see the module's docstring.

    A prefix's state is the CTC forward variables of its letters (`n`: ending in its last letter, `b`: in a blank,
    per frame); extending it by a letter is two linear recurrences, computed in closed form with `logcumsumexp`
    (float64) instead of a loop over frames. States are kept per letter string, so beams that spell the same text
    share them.
    """

    def __init__(self, log_probs: torch.Tensor, tokenizer, weight: float, eos_ids: list[int], bonus: float = 1.0,
                 lexicon: tuple[set, set] | None = None, llm_candidates: int = 8, head_candidates: int = 16,
                 depth: int = 10, beam: int = 8, tokens_of: dict[str, list[int]] | None = None):
        self.x = log_probs.double()  # (frames, 1 + letters)
        self.blank_sum = torch.cumsum(self.x[:, 0], 0)
        self.tokenizer, self.weight, self.eos_ids, self.bonus = tokenizer, weight, set(eos_ids), bonus
        self.lexicon, self.llm_candidates, self.head_candidates = lexicon, llm_candidates, head_candidates
        self.depth, self.beam = depth, beam
        self.states = {"": (torch.full_like(self.blank_sum, NEG), self.blank_sum.clone(), 0.0)}
        self.texts: dict[tuple, str | None] = {}
        self.tokens_of = tokens_of if tokens_of is not None else spelled_tokens(tokenizer)

    def text(self, ids: list[int]) -> str | None:
        """The letters a token sequence spells (other characters dropped, whitespace as one space; None: digits)."""
        key = tuple(ids)
        if key not in self.texts:
            raw = self.tokenizer.decode(list(ids), skip_special_tokens=True).lower().replace("-", " ")
            kept = "".join(c if c in INDEX else (" " if c.isspace() else "") for c in raw)
            trailing = " " if kept.endswith(" ") and kept.strip() else ""
            self.texts[key] = None if any(c.isdigit() for c in raw) else " ".join(kept.split()) + trailing
        return self.texts[key]

    def valid(self, text: str, final: bool = False) -> bool:
        """Every finished word in the lexicon and the unfinished one the beginning of one (`final`: none unfinished)."""
        if self.lexicon is None:
            return True
        words, beginnings = self.lexicon
        parts = text.split(" ")
        done, partial = (parts, "") if final else (parts[:-1], parts[-1])
        return all(word in words for word in done if word) and (not partial or partial in beginnings)

    def state(self, text: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(n, b, log-probability that the audio begins with `text`), extended letter by letter from a known one."""
        if text in self.states:
            return self.states[text]
        parent = text[:-1]
        n, b, _ = self.state(parent)
        letter = self.x[:, INDEX[text[-1]]]
        # Complete by the frame before: a repeated letter needs a blank between the two.
        phi = b if parent and parent[-1] == text[-1] else torch.logaddexp(n, b)
        total = torch.cumsum(letter, 0)
        first = letter[0] if not parent else torch.tensor(NEG, dtype=torch.float64)
        before = torch.cat([torch.tensor([NEG], dtype=torch.float64), torch.logcumsumexp(phi - total, 0)[:-1]])
        new_n = total + torch.logaddexp(before, first - total[0])
        blanks = torch.logcumsumexp(new_n - self.blank_sum, 0)
        new_b = self.blank_sum + torch.cat([torch.tensor([NEG], dtype=torch.float64), blanks[:-1]])
        psi = torch.logaddexp(first, torch.logsumexp(phi[:-1] + letter[1:], 0)) if len(letter) > 1 else first
        self.states[text] = (new_n, new_b, float(psi))
        return self.states[text]

    def complete(self, text: str) -> float:
        """Log-probability that the audio holds exactly `text`."""
        n, b, _ = self.state(text.rstrip())
        return float(torch.logaddexp(n[-1], b[-1]))

    def next_letters(self, text: str) -> torch.Tensor:
        """Prefix log-probability of `text` + each letter, all at once."""
        n, b, _ = self.state(text)
        start = torch.tensor([0.0 if not text else NEG], dtype=torch.float64)
        scores = torch.logsumexp(torch.cat([start, torch.logaddexp(n, b)[:-1]])[:, None] + self.x, 0)
        if text:
            repeat = INDEX[text[-1]]
            scores[repeat] = torch.logsumexp(torch.cat([start, b[:-1]]) + self.x[:, repeat], 0)
        scores[0] = NEG
        return scores

    def proposals(self, prefix: str) -> list[int]:
        """The tokens the head's best letter paths after `prefix` spell (a beam over letters, `depth` deep)."""
        found: dict[int, float] = {}
        pieces = [""]
        for _ in range(self.depth):
            grown = []
            for piece in pieces:
                scores = self.next_letters(prefix + piece)
                for letter in scores.topk(6).indices.tolist():
                    if self.valid(prefix + piece + CHARS[letter - 1]):
                        grown.append((float(scores[letter]), piece + CHARS[letter - 1]))
            grown.sort(reverse=True)
            pieces = [piece for _, piece in grown[: self.beam]]
            for score, piece in grown[: self.beam]:
                spaced = [" " + piece] if not prefix or prefix.endswith(" ") else []
                for token in [t for key in [piece, *spaced] for t in self.tokens_of.get(key, [])]:
                    found.setdefault(token, score)
        return sorted(found, key=found.get, reverse=True)[: self.head_candidates]

    def _score_row(self, ids: list[int], prefix: str, llm: torch.Tensor, out: torch.Tensor) -> None:
        """Joint scores of one row's candidates written into `out` (the rest stay -inf)."""
        base = self.state(prefix)[2]
        for token in dict.fromkeys(llm.topk(self.llm_candidates).indices.tolist() + self.proposals(prefix)):
            if token in self.eos_ids:
                if self.valid(prefix.rstrip(), final=True):
                    out[token] = (1 - self.weight) * llm[token] + self.weight * (self.complete(prefix) - base)
                continue
            extended = self.text(ids + [token])
            if extended is None or extended == prefix or not self.valid(extended):
                continue  # digits, no letter added (nothing is free), or not a word
            gain = self.state(extended)[2] - base + self.bonus * (len(extended.rstrip()) - len(prefix.rstrip()))
            out[token] = (1 - self.weight) * llm[token] + self.weight * gain

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        llm = scores.float().log_softmax(-1)
        out = torch.full_like(llm, NEG)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            prefix = self.text(ids)
            if (ids and ids[-1] in self.eos_ids) or prefix is None:
                out[row] = llm[row]
                continue
            self._score_row(ids, prefix, llm[row], out[row])
            if not torch.isfinite(out[row]).any() and self.lexicon is not None:
                # A dead end (no candidate goes on to a word): this step without the word list.
                lexicon, self.lexicon = self.lexicon, None
                self._score_row(ids, prefix, llm[row], out[row])
                self.lexicon = lexicon
        return out.to(scores.dtype)


def word_lexicon(manifests: dict) -> tuple[set, set]:
    if not WORD_LIST.is_file():
        raise SystemExit(f"--lexicon needs {WORD_LIST}: apt-get install wamerican (or give --no-lexicon)")
    # The list holds every letter as a word, which lets the decoding spell a word it cannot find letter by letter.
    words = {w for w in WORD_LIST.read_text().split() if all(c in INDEX for c in w) and (len(w) > 1 or w in "ai")}
    words |= {w for row in manifest_records(manifests["train"]) for w in letters(row["text"]).split()}
    return words, {word[:i] for word in words for i in range(1, len(word) + 1)}


def decode(args) -> None:
    from speechlm.audio import load_audio
    from speechlm.inference import load_pretrained, transcribe_arrays

    _, manifests, _, encoder_model, cache = corpus_and_cache()
    head = CharCTCHead()
    head.load_state_dict(torch.load(head_file(args.steps, args.seed)))
    head.eval()
    lexicon = word_lexicon(manifests) if args.lexicon else None
    lines = []
    for model_dir in args.models:
        processor, model = load_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        tokens_of = spelled_tokens(processor.tokenizer)
        cells = []
        for name in args.sets:
            rows = manifest_records(manifests[name])[: args.limit]
            start, hypotheses = time.monotonic(), []
            for row, frames in zip(rows, frames_of(cache, encoder_model, processor, rows), strict=True):
                with torch.no_grad():
                    log_probs = head(frames).log_softmax(-1)
                scorer = CharPrefixScorer(log_probs, processor.tokenizer, args.weight, eos, args.bonus, lexicon,
                                          tokens_of=tokens_of)
                text = transcribe_arrays(model, processor, [load_audio(row["audio"])], batch_size=1,
                                         max_new_tokens=MAX_NEW_TOKENS.get(name, 48),
                                         tokens_per_second=TOKENS_PER_SECOND, num_beams=args.num_beams,
                                         joint_ctc_weight=0.0, logits_processor=LogitsProcessorList([scorer]))[0]
                hypotheses.append(normalize_text(text, spell_numbers=True))
            metrics = word_error_rate([row["text"] for row in rows], hypotheses)
            cells.append(f"{100 * metrics['wer']:.1f} % ({metrics['insertions']})")
            print(f"{model_dir} {name}: WER {metrics['wer']:.1%}, {metrics['insertions']} inserted words "
                  f"({time.monotonic() - start:.0f} s)", flush=True)
            worst = sorted(zip(rows, hypotheses), key=lambda pair: -word_error_rate(pair[0]["text"], pair[1])["wer"])
            for row, hypothesis in worst[:3]:
                print(f"    worst: {row['id']}\n    ref: {row['text']}\n    hyp: {hypothesis}", flush=True)
        lines.append(f"| {model_dir} | w {args.weight}, bonus {args.bonus}, lexicon {'yes' if lexicon else 'no'} | "
                     + " | ".join(cells) + " |")
    table = [f"| model | decoding | {' | '.join(args.sets)} |", "|---|---|" + "---|" * len(args.sets), *lines]
    print("\n".join(table))
    if args.limit is None:
        args.output.write_text("# Joint decoding with a character CTC head held to a word list\n\n"
                               f"`python benchmarks/char_ctc.py decode --models ... --weight {args.weight} "
                               f"--bonus {args.bonus}` (WER %, inserted words; {args.num_beams} beams)\n\n"
                               + "\n".join(table) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "decode"):
        command = sub.add_parser(name)
        command.add_argument("--steps", type=int, default=4000, help="the head's training steps (decode: which head)")
        command.add_argument("--seed", type=int, default=0)
    sub.choices["train"].add_argument("--learning-rate", type=float, default=1e-3)
    sub.choices["train"].add_argument("--batch-size", type=int, default=8)
    options = sub.choices["decode"]
    options.add_argument("--models", nargs="+", required=True)
    options.add_argument("--weight", type=float, default=0.5, help="the character head's share against the LLM's")
    options.add_argument("--bonus", type=float, default=1.0, help="added per letter written (longer words otherwise "
                         "lose to their first letters, whose prefix score is nearly the same)")
    options.add_argument("--lexicon", action=argparse.BooleanOptionalAction, default=True)
    options.add_argument("--sets", nargs="+", default=list(TEST_SETS))
    options.add_argument("--limit", type=int, help="the first N clips of each set (no results file)")
    options.add_argument("--num-beams", type=int, default=4)
    options.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "char_ctc_decode.md")
    args = parser.parse_args()
    train(args) if args.command == "train" else decode(args)


if __name__ == "__main__":
    main()
