"""How well do the projector + CTC head alone transcribe (greedy CTC, no LLM) after a CTC-only pre-alignment?

Separates the acoustic side (what the projector reads out of the frozen encoder) from the LLM side: the demo's
pre-alignment, run for STEPS batches (a fixed number, so a busy machine gives the same head) on the cached training
frames of a `speechlm demo` corpus, then greedy CTC decoding of the training clips, the held-out synthetic set (WER
and clips heard exactly per voice group and per espeak-ng accent) and the held-out Asterisk set. A cheap probe of
the levers that change what the model hears (`--voice-perturbation`), minutes instead of a whole demo run.
`--evaluate-at` also reports at earlier steps of the same run: the head's curve over pre-alignment length.

    python scripts/ctc_head_wer.py 4000 [--n-train 9000] [--masking 0.1] [--batch-size 8] [--seed 0]
                                        [--voice-perturbation 0.1] [--accent-fraction 0.5] [--evaluate-at 2000 ...]
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import torch

from speechlm.alignment import CTCAlignmentHead
from speechlm.cache import cache_dir
from speechlm.data import EncoderCache, SpeechLMCollator, SpeechLMDataset
from speechlm.demo import run as demo
from speechlm.demo.corpus import manifest_records
from speechlm.demo.render import voice_group
from speechlm.evaluation import word_error_rate


@torch.no_grad()
def greedy_ctc(model, head: CTCAlignmentHead, collator: SpeechLMCollator, dataset: SpeechLMDataset) -> list[str]:
    """The head's greedy CTC transcripts of a dataset's cached frames, 32 clips at a time."""
    texts = []
    for start in range(0, len(dataset), 32):
        batch = collator([dataset[i] for i in range(start, min(start + 32, len(dataset)))])
        token_ids = head.greedy_token_ids(*head.logits(model, batch))
        texts += [text.strip() for text in collator.processor.tokenizer.batch_decode(token_ids)]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("steps", type=int)
    parser.add_argument("--n-train", type=int, default=demo.DemoSettings.n_train)
    parser.add_argument("--masking", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the head's initialisation and the batch order")
    parser.add_argument("--voice-perturbation", type=float, default=0.0)
    parser.add_argument("--accent-fraction", type=float, default=0.0)
    parser.add_argument("--evaluate-at", type=int, nargs="*", default=[], help="earlier steps to report at as well")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    settings = demo.DemoSettings(n_train=args.n_train, lora_rank=0, voice_perturbation=args.voice_perturbation,
                                 accent_fraction=args.accent_fraction)
    root, manifests = demo.demo_corpus(settings)
    processor, model = demo.load_parts(settings)
    cache = EncoderCache.for_model(model, processor, dtype=torch.float16)
    key = demo.manifest_key(manifests["train"])
    cache_file = cache_dir("demo", "ctc-head-wer") / f"frames-{cache.fingerprint[:10]}-{key}.safetensors"
    # the demo's own training frames of this corpus, where a run encoded them (a file for another encoder loads none)
    for frames in [cache_file, *sorted(root.glob("train-frames-*.safetensors"))]:
        if frames.is_file():
            cache.load(frames)
    sets = {}
    for name in ("train", "test_synthetic", "test_asterisk"):
        sets[name] = SpeechLMDataset(manifest_records(manifests[name]), processor.sampling_rate, encoder_cache=cache)
        if cache.fill(model, processor, sets[name], batch_size=32):
            cache.save(cache_file)

    dataset = sets["train"]
    texts = [record["text"] for record in dataset.records]
    collator = SpeechLMCollator(processor, cache, frame_masking=args.masking)
    head = CTCAlignmentHead(model.config.text_config.hidden_size, processor.tokenizer.all_special_ids,
                            vocabulary_ids=demo.corpus_token_ids(processor, texts))
    parameters = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
    first = SpeechLMDataset(dataset.records[:500], processor.sampling_rate, encoder_cache=cache)
    evaluated = {"train (first 500)": first, "synthetic": sets["test_synthetic"], "asterisk": sets["test_asterisk"]}
    start = time.monotonic()
    for step in range(1, args.steps + 1):
        index = random.sample(range(len(dataset)), args.batch_size)
        loss = head(model, collator([dataset[i] for i in index]))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 500 == 0:
            print(f"step {step}: CTC loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)", flush=True)
        if step in args.evaluate_at or step == args.steps:
            report(step, model, head, collator, evaluated)


def report(step: int, model, head: CTCAlignmentHead, collator: SpeechLMCollator, evaluated: dict) -> None:
    """The head's greedy WER on each set after `step` steps (the synthetic set per voice group and accent)."""
    training, masking, collator.frame_masking = model.training, collator.frame_masking, 0.0
    model.eval()
    for name, eval_set in evaluated.items():
        eval_rows = eval_set.records
        hypotheses = greedy_ctc(model, head, collator, eval_set)
        metrics = word_error_rate([row["text"] for row in eval_rows], hypotheses)
        print(f"step {step}, CTC head alone, {name}: WER {metrics['wer']:.1%}  CER {metrics['cer']:.1%}  "
              f"({len(eval_rows)} clips)", flush=True)
        if name == "synthetic":
            groups = collections.defaultdict(list)
            for row, hypothesis in zip(eval_rows, hypotheses, strict=True):
                voice = row["extra"].get("voice", "?")
                pair = (row["text"], hypothesis)
                groups[voice_group(voice)].append(pair)
                groups["  " + voice.split("+")[0]].append(pair)
            for group, pairs in sorted(groups.items()):
                wer = word_error_rate([r for r, _ in pairs], [h for _, h in pairs])["wer"]
                exact = sum(word_error_rate(r, h)["wer"] == 0 for r, h in pairs)
                print(f"    {group}: {wer:.1%}, {exact} of {len(pairs)} clips exact", flush=True)
    collator.frame_masking = masking
    model.train(training)


if __name__ == "__main__":
    main()
